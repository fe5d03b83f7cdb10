"""fastreg.export: ONNX (run by onnxruntime), Keras and PyTorch peers give model.predict's
outputs for every activation, layer and loss, Sequential and MultiTask."""
import importlib.util
import os

import numpy as np
import pytest

import fastreg as fr
from fastreg import export

ACTS = [None, "relu", "leaky_relu", "tanh", "sigmoid"]
LOSSES = {"mse": 2, "binary_crossentropy": 1, "sparse_categorical_crossentropy": 3}
# float32 rounding of a few layers of float32 arithmetic (DESIGN.md: float32 tolerance)
TOL = dict(rtol=2e-5, atol=2e-6)


def _have(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _keras():
    if "KERAS_BACKEND" not in os.environ:
        os.environ["KERAS_BACKEND"] = "jax" if _have("jax") else "torch"
    return pytest.importorskip("keras")


def _inputs(n=64, width=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def _with_random_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial gamma, beta and running statistics, through the
    public set_weights (BatchNorm arrays follow W, b: gamma, beta, mean, variance)."""
    rng = np.random.default_rng(seed)
    weights = model.get_weights()
    layers = (model.layers if isinstance(model, fr.Sequential)
              else model.trunk_layers + [la for h in model.head_names
                                         for la in model.head_layers(h)])
    i = 0
    for layer in layers:
        if isinstance(layer, fr.Dense):
            weights[i + 1] = rng.normal(scale=0.3, size=weights[i + 1].shape)  # biases too
            i += 2
        elif isinstance(layer, fr.BatchNorm):
            u = weights[i].shape
            weights[i:i + 4] = [rng.uniform(0.5, 1.5, u), rng.normal(scale=0.5, size=u),
                                rng.normal(scale=0.5, size=u), rng.uniform(0.3, 2.0, u)]
            i += 4
    model.set_weights(weights)
    return model


def every_layer(act="relu", loss="mse", dtype="float32", width=5):
    """Every layer kind and placement fastreg has: input noise + dropout, a Dense with its own
    dropout and a BatchNorm and a noise layer after it, a bias-free Dense with BatchNorm, a
    bias-free Dense without, a standalone Dropout, and the output Dense."""
    model = fr.Sequential([fr.GaussianNoise(0.1), fr.Dropout(0.1),
                           fr.Dense(16, act, dropout=0.2, negative_slope=0.2), fr.BatchNorm(),
                           fr.GaussianDropout(0.2),
                           fr.Dense(12, act, use_bias=False), fr.BatchNorm(eps=1e-2),
                           fr.GaussianNoise(0.3),
                           fr.Dense(8, act, use_bias=False), fr.Dropout(0.3),
                           fr.Dense(LOSSES[loss])], input_dim=width, seed=1, dtype=dtype)
    model.compile(loss=loss)
    return _with_random_batchnorm(model)


def multitask(act="tanh"):
    model = fr.MultiTask(
        trunk=[fr.Dropout(0.1), fr.Dense(16, act, dropout=0.1), fr.BatchNorm(),
               fr.Dense(8, act), fr.GaussianDropout(0.1)],
        heads={"price": ([fr.Dense(2)], "mse"),
               "kind": ([fr.Dropout(0.2), fr.Dense(6, "relu"), fr.BatchNorm(), fr.Dense(3)],
                        "sparse_categorical_crossentropy"),
               "odd.flag": ([fr.GaussianNoise(0.2), fr.Dense(1, use_bias=False)],
                            "binary_crossentropy")},
        input_dim=5, seed=2)
    model.compile()
    return _with_random_batchnorm(model, seed=3)


# ---------------------------------------------------------------- ONNX
def _onnx_run(model, X):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    proto = export.to_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    return proto, dict(zip(names, session.run(None, {"input": X})))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_onnx_equals_predict_for_every_activation_and_loss(act, loss):
    model = every_layer(act, loss)
    X = _inputs()
    proto, out = _onnx_run(model, X)
    np.testing.assert_allclose(out["output"], model.predict(X), **TOL)
    ops = {n.op_type for n in proto.graph.node}
    # inference only: no dropout, noise or batch normalization node; BatchNorm is folded
    assert ops <= {"Gemm", "MatMul", "Relu", "LeakyRelu", "Tanh", "Sigmoid", "Softmax",
                   "Identity"}
    assert ("MatMul" in ops) and ("Gemm" in ops)       # the bias-free Dense, the others
    expected_act = {None: None, "relu": "Relu", "leaky_relu": "LeakyRelu", "tanh": "Tanh",
                    "sigmoid": "Sigmoid"}[act]
    if expected_act:
        assert expected_act in ops
    if loss == "sparse_categorical_crossentropy":
        assert "Softmax" in ops


def test_onnx_after_training_with_a_free_batch_dimension(tmp_path):
    X = _inputs(256)
    y = np.tanh(X[:, :2]).astype(np.float32)
    model = fr.Sequential([fr.Dense(16, "leaky_relu", dropout=0.1), fr.BatchNorm(),
                           fr.Dense(2)], input_dim=5, seed=0)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2))
    model.fit(X, y, epochs=3, batch_size=32, verbose=0)      # real running statistics
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = model.export(tmp_path / "model.onnx")
    assert path == str(tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(path))
    session = ort.InferenceSession(path)
    for rows in (1, 7, 256):
        np.testing.assert_allclose(session.run(None, {"input": X[:rows]})[0],
                                   model.predict(X[:rows]), **TOL)


def test_onnx_of_a_float64_model_is_float32_within_rounding():
    model = every_layer("tanh", "mse", dtype="float64")
    X = _inputs()
    _, out = _onnx_run(model, X)
    assert out["output"].dtype == np.float32
    np.testing.assert_allclose(out["output"], model.predict(X.astype(np.float64)), **TOL)


def test_onnx_multitask_has_one_output_per_head():
    model = multitask()
    X = _inputs()
    proto, out = _onnx_run(model, X)
    assert [o.name for o in proto.graph.output] == model.head_names
    expected = model.predict(X)
    for head in model.head_names:
        np.testing.assert_allclose(out[head], expected[head], **TOL)
    # the trunk is computed once: its first Gemm appears once
    assert sum(n.name == "trunk/dense_0/gemm" for n in proto.graph.node) == 1


def test_export_refuses_what_it_cannot_write():
    pytest.importorskip("onnx")
    unbuilt = fr.Sequential([fr.Dense(1)])
    unbuilt.compile()
    with pytest.raises(ValueError, match="no weights"):
        unbuilt.export("never.onnx")
    model = every_layer()
    with pytest.raises(ValueError, match="format"):
        model.export("m.tflite", format="tflite")
    with pytest.raises(ValueError, match="opset"):
        export.to_onnx(model, opset=11)
    with pytest.raises(TypeError, match="Sequential or MultiTask"):
        export.to_onnx(object())
    assert not os.path.exists("never.onnx")


# ---------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_torch_peer_equals_predict(act, loss):
    torch = pytest.importorskip("torch")
    model = every_layer(act, loss)
    X = _inputs()
    peer = model.to_torch()
    assert not peer.training
    with torch.no_grad():
        out = peer(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(out, model.predict(X), **TOL)


def test_torch_peer_has_the_training_layers_in_fastregs_order():
    torch = pytest.importorskip("torch")
    from fastreg import _torch_peer as torch_peer
    peer = every_layer("leaky_relu", "sparse_categorical_crossentropy").to_torch()
    kinds = [type(m).__name__ for m in peer]
    assert kinds == ["GaussianNoise", "Dropout",
                     "Linear", "BatchNorm1d", "LeakyReLU", "GaussianDropout", "Dropout",
                     "Linear", "BatchNorm1d", "LeakyReLU", "GaussianNoise",
                     "Linear", "LeakyReLU", "Dropout",
                     "Linear", "Softmax"]
    assert peer[1].p == pytest.approx(0.1) and peer[6].p == pytest.approx(0.2)
    assert peer[3].momentum == pytest.approx(0.01)           # 1 - fastreg's momentum
    assert peer[8].eps == pytest.approx(1e-2) and peer[7].bias is None
    assert peer[4].negative_slope == pytest.approx(0.2)
    # the noise modules are training-only
    noise = torch_peer.GaussianNoise(0.5)
    x = torch.ones(4, 3)
    assert torch.equal(noise.eval()(x), x) and not torch.equal(noise.train()(x), x)


def test_torch_peer_of_a_float64_model_is_float64():
    torch = pytest.importorskip("torch")
    model = every_layer("sigmoid", "mse", dtype="float64")
    X = _inputs().astype(np.float64)
    with torch.no_grad():
        out = model.to_torch()(torch.from_numpy(X)).numpy()
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-10, atol=1e-12)


def test_torch_peer_of_a_multitask():
    torch = pytest.importorskip("torch")
    model = multitask("relu")
    X = _inputs()
    with torch.no_grad():
        out = model.to_torch()(torch.from_numpy(X))
    assert list(out) == model.head_names
    expected = model.predict(X)
    for head in model.head_names:
        np.testing.assert_allclose(out[head].numpy(), expected[head], **TOL)


# ---------------------------------------------------------------- Keras
@pytest.mark.parametrize("act", ACTS)
def test_keras_peer_equals_predict(act):
    _keras()
    for loss in sorted(LOSSES):
        model = every_layer(act, loss)
        X = _inputs()
        out = np.asarray(model.to_keras().predict(X, verbose=0))
        np.testing.assert_allclose(out, model.predict(X), **TOL)


def test_keras_peer_has_the_training_layers():
    _keras()
    peer = every_layer("relu", "binary_crossentropy").to_keras()
    kinds = [type(la).__name__ for la in peer.layers]
    assert kinds == ["GaussianNoise", "Dropout",
                     "Dense", "BatchNormalization", "Activation", "GaussianDropout",
                     "Dropout",
                     "Dense", "BatchNormalization", "Activation", "GaussianNoise",
                     "Dense", "Activation", "Dropout",
                     "Dense", "Activation"]
    assert peer.layers[3].momentum == pytest.approx(0.99)
    assert peer.layers[8].epsilon == pytest.approx(1e-2)
    assert not peer.layers[7].use_bias


def test_keras_peer_of_a_multitask():
    _keras()
    model = multitask("sigmoid")
    X = _inputs()
    out = model.to_keras().predict(X, verbose=0)
    expected = model.predict(X)
    assert set(out) == set(model.head_names)
    for head in model.head_names:
        np.testing.assert_allclose(np.asarray(out[head]), expected[head], **TOL)


def test_a_weight_layout_export_does_not_know_is_refused():
    """export reads get_weights() in the documented order; a model whose list does not match
    its layers (e.g. after a change of layout) is an error, not a wrong graph."""
    class Short(fr.Sequential):
        def get_weights(self):
            return super().get_weights()[:-1]

    class Long(fr.Sequential):
        def get_weights(self):
            return super().get_weights() + [np.zeros(3, np.float32)]

    for cls, match in ((Short, "fewer arrays"), (Long, "more arrays")):
        model = cls([fr.Dense(4, "relu"), fr.BatchNorm(), fr.Dense(1)], input_dim=2)
        with pytest.raises(ValueError, match=match):
            export.read_model(model)
