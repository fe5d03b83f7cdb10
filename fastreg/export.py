"""Export: a fastreg model as an ONNX inference graph, a Keras model or a PyTorch module.

    model.export("model.onnx")      # fr.Sequential or fr.MultiTask; needs onnx
    peer = model.to_keras()         # keras.Sequential / keras.Model; needs keras
    peer = model.to_torch()         # torch.nn.Module in eval mode; needs torch

Built from the model's public surface only: its layers' get_config(), get_weights() (Keras'
order: W, b per Dense, then gamma, beta, moving mean, moving variance after a Dense with
BatchNorm), model.loss / model.losses, and the README's BatchNorm folding formula. The model's
internals are free to change under it.

ONNX (the `onnx` package builds and checks the graph; onnxruntime runs it): an inference graph
in float32 (a float64 model's weights are rounded to float32), opset 17 by default, input
"input" of shape (N, input_dim) with a free batch dimension N. Per Dense: Gemm (MatMul
without a bias) with any BatchNorm folded in, as predict folds it:
W' = W * s, b' = (b - moving_mean) * s + beta, s = gamma / sqrt(moving_variance + eps),
computed in float64 and rounded once; then the activation. Dropout, GaussianNoise and
GaussianDropout are training-only and leave no node. The cross-entropy losses end in their
output transform (Sigmoid for binary_crossentropy, Softmax over the last axis for
sparse_categorical_crossentropy), so the graph returns what predict returns. A Sequential has
one output, "output"; a MultiTask one output per head, named by the head, the trunk computed
once (node and weight names: "trunk/dense_0/W", "heads/<head>/dense_0/W", ...).

Keras and PyTorch: the same layers as peer layers, not folded (a peer can be trained
further): Dense/Linear (linear), then BatchNormalization/BatchNorm1d with the running
statistics (PyTorch's momentum is 1 - fastreg's; PyTorch updates its running variance with the
unbiased batch variance, Keras and fastreg with the biased one), then the activation, then the
noise layers and dropouts in fastreg's order (activation, noise, dropout; a Dense's own
dropout= last), then the output transform as in ONNX. Keras has GaussianNoise and
GaussianDropout; for PyTorch they are small modules in fastreg._torch_peer. Penalties and
constraints are not carried over (their conventions differ: L2 is lambda/2 * sum W^2 here,
L1 is proximal), except activity penalties (Dense(activity_regularizer=...),
ActivityRegularization), whose formula is Keras': the Keras peer gets a
keras.layers.ActivityRegularization(l1, l2) after the activation (where fastreg applies it:
before the noise and dropout); ONNX and PyTorch leave them out (training only, no effect on
inference). Predictions equal model.predict to float32 rounding.

Adding an activation is one entry in ACTIVATIONS: its ONNX nodes, its Keras layer and its
PyTorch module.
"""
import os
from dataclasses import dataclass

import numpy as np

ONNX_OPSET = 17


# ---------------------------------------------------------------- the per-activation table
@dataclass(frozen=True)
class Activation:
    """How one activation is written in each format. onnx(helper, x, out, cfg) -> nodes
    computing out from x; keras(keras, cfg, name) -> a layer; torch(nn, cfg) -> a module.
    cfg is the Dense layer's get_config()."""
    onnx: object
    keras: object
    torch: object


def _onnx_op(op, **fixed):
    def nodes(helper, x, out, cfg):
        return [helper.make_node(op, [x], [out], **fixed)]
    return nodes


def _keras_activation(name):
    return lambda keras, cfg, layer_name: keras.layers.Activation(name, name=layer_name)


def _onnx_const(helper, name, value):
    """A float32 scalar Constant node named `name`."""
    from onnx import TensorProto
    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _names(out):
    """The namer of an activation's intermediate ONNX values: out/<suffix>."""
    def name(suffix):
        return f"{out}/{suffix}"
    return name


def _onnx_gelu(helper, x, out, cfg):
    """x * 0.5 * (1 + Erf(x / sqrt 2)): opset 17 has no Gelu (20 has)."""
    c = _names(out)
    return [_onnx_const(helper, c("sqrt_half"), 0.7071067811865476),
            _onnx_const(helper, c("one"), 1.0), _onnx_const(helper, c("half"), 0.5),
            helper.make_node("Mul", [x, c("sqrt_half")], [c("scaled")]),
            helper.make_node("Erf", [c("scaled")], [c("erf")]),
            helper.make_node("Add", [c("erf"), c("one")], [c("cdf2")]),
            helper.make_node("Mul", [c("cdf2"), c("half")], [c("cdf")]),
            helper.make_node("Mul", [x, c("cdf")], [out])]


def _onnx_gelu_tanh(helper, x, out, cfg):
    """0.5 x (1 + Tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    c = _names(out)
    return [_onnx_const(helper, c("k"), 0.7978845608028654),
            _onnx_const(helper, c("c"), 0.044715), _onnx_const(helper, c("one"), 1.0),
            _onnx_const(helper, c("half"), 0.5),
            helper.make_node("Mul", [x, x], [c("x2")]),
            helper.make_node("Mul", [c("x2"), x], [c("x3")]),
            helper.make_node("Mul", [c("x3"), c("c")], [c("cx3")]),
            helper.make_node("Add", [x, c("cx3")], [c("inner0")]),
            helper.make_node("Mul", [c("inner0"), c("k")], [c("inner")]),
            helper.make_node("Tanh", [c("inner")], [c("tanh")]),
            helper.make_node("Add", [c("tanh"), c("one")], [c("t1")]),
            helper.make_node("Mul", [x, c("half")], [c("halfx")]),
            helper.make_node("Mul", [c("halfx"), c("t1")], [out])]


def _onnx_times(inner_nodes):
    """x * g(x), g given by nodes(helper, x, out) (silu: Sigmoid; mish: Tanh(Softplus))."""
    def nodes(helper, x, out, cfg):
        g = f"{out}/g"
        return inner_nodes(helper, x, g) + [helper.make_node("Mul", [x, g], [out])]
    return nodes


def _torch_peer(name):
    def module(nn, cfg):
        from . import _torch_peer
        return getattr(_torch_peer, name)()
    return module


ACTIVATIONS = {
    None: None,      # linear: no node, no layer
    "relu": Activation(
        onnx=_onnx_op("Relu"),
        keras=_keras_activation("relu"),
        torch=lambda nn, cfg: nn.ReLU()),
    "leaky_relu": Activation(
        onnx=lambda helper, x, out, cfg: [helper.make_node("LeakyRelu", [x], [out],
                                                           alpha=float(cfg["negative_slope"]))],
        keras=lambda keras, cfg, name: keras.layers.LeakyReLU(
            negative_slope=float(cfg["negative_slope"]), name=name),
        torch=lambda nn, cfg: nn.LeakyReLU(float(cfg["negative_slope"]))),
    "tanh": Activation(
        onnx=_onnx_op("Tanh"),
        keras=_keras_activation("tanh"),
        torch=lambda nn, cfg: nn.Tanh()),
    "sigmoid": Activation(
        onnx=_onnx_op("Sigmoid"),
        keras=_keras_activation("sigmoid"),
        torch=lambda nn, cfg: nn.Sigmoid()),
    "gelu": Activation(             # Keras 3's "gelu" is the exact form
        onnx=_onnx_gelu,
        keras=_keras_activation("gelu"),
        torch=lambda nn, cfg: nn.GELU(approximate="none")),
    "gelu_tanh": Activation(
        onnx=_onnx_gelu_tanh,
        keras=lambda keras, cfg, name: keras.layers.Activation(
            lambda x: keras.activations.gelu(x, approximate=True), name=name),
        torch=lambda nn, cfg: nn.GELU(approximate="tanh")),
    "elu": Activation(
        onnx=lambda helper, x, out, cfg: [helper.make_node("Elu", [x], [out],
                                                           alpha=float(cfg.get("alpha", 1.0)))],
        keras=lambda keras, cfg, name: keras.layers.ELU(alpha=float(cfg.get("alpha", 1.0)),
                                                        name=name),
        torch=lambda nn, cfg: nn.ELU(float(cfg.get("alpha", 1.0)))),
    "selu": Activation(
        onnx=lambda helper, x, out, cfg: [helper.make_node(
            "Selu", [x], [out], alpha=1.6732632423543772, gamma=1.0507009873554805)],
        keras=_keras_activation("selu"),
        torch=lambda nn, cfg: nn.SELU()),
    "silu": Activation(
        onnx=_onnx_times(lambda helper, x, g: [helper.make_node("Sigmoid", [x], [g])]),
        keras=_keras_activation("silu"),
        torch=lambda nn, cfg: nn.SiLU()),
    "softplus": Activation(
        onnx=_onnx_op("Softplus"),
        keras=_keras_activation("softplus"),
        torch=lambda nn, cfg: nn.Softplus()),
    "mish": Activation(
        onnx=_onnx_times(lambda helper, x, g: [helper.make_node("Softplus", [x], [f"{g}/sp"]),
                                               helper.make_node("Tanh", [f"{g}/sp"], [g])]),
        keras=_keras_activation("mish"),
        torch=lambda nn, cfg: nn.Mish()),
    "hard_sigmoid": Activation(     # relu6(x + 3) / 6 = clip(x / 6 + 1/2, 0, 1)
        onnx=lambda helper, x, out, cfg: [helper.make_node("HardSigmoid", [x], [out],
                                                           alpha=1.0 / 6.0, beta=0.5)],
        keras=_keras_activation("hard_sigmoid"),
        torch=lambda nn, cfg: nn.Hardsigmoid()),
    # on a categorical model's last Dense: the probabilities (the loss's transform is then
    # not added again: Part.transform)
    "softmax": Activation(
        onnx=_onnx_op("Softmax", axis=-1),
        keras=lambda keras, cfg, name: keras.layers.Softmax(axis=-1, name=name),
        torch=lambda nn, cfg: nn.Softmax(dim=-1)),
}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]

# What predict applies to the last layer's values, by the loss's contract `output` (None:
# the values themselves).
OUTPUT_TRANSFORMS = {
    "identity": None,
    "sigmoid": ACTIVATIONS["sigmoid"],
    "softmax": ACTIVATIONS["softmax"],
    "exp": Activation(
        onnx=_onnx_op("Exp"),
        keras=_keras_activation("exponential"),
        torch=_torch_peer("Exp")),
}


def output_transform(loss):
    """The Activation predict applies after the last layer for a loss name (None: none)."""
    if loss is None:
        return None
    from .kernels import contract
    return OUTPUT_TRANSFORMS[contract.LOSS_BY_CODE[contract.LOSSES[loss]].output]


# ---------------------------------------------------------------- reading a model
@dataclass
class Block:
    """A Dense layer and what follows it up to the next Dense: its BatchNorm (or None), its
    training-only layers (configs, in fastreg's order) and its arrays."""
    dense: dict
    bn: dict
    train_only: list
    W: np.ndarray
    b: np.ndarray            # shape (0,) without a bias
    bn_arrays: tuple         # (gamma, beta, moving_mean, moving_variance) or None
    activity: tuple = (0.0, 0.0)   # (l1, l2) of its activity penalty (training only)

    def folded(self, dtype=np.float32):
        """(W', b' or None) for inference, BatchNorm folded in float64, rounded once."""
        W = self.W.astype(np.float64)
        b = self.b.astype(np.float64) if self.b.size else None
        if self.bn is not None:
            gamma, beta, mean, var = (a.astype(np.float64) for a in self.bn_arrays)
            # eps rounded to the model's dtype first: training adds it in that dtype
            eps = float(self.W.dtype.type(self.bn["eps"]))
            s = gamma / np.sqrt(var + eps)
            W = W * s
            b = ((b if b is not None else 0.0) - mean) * s + beta
        return (np.ascontiguousarray(W, dtype),
                None if b is None else np.ascontiguousarray(b, dtype))


@dataclass
class Part:
    """A stack of layers as it is exported: the training-only layers on its inputs, its
    blocks, and the loss whose output transform ends it (None for a MultiTask trunk)."""
    name: str
    input_train_only: list
    blocks: list
    loss: str

    @property
    def transform(self):
        """What ends the part: the loss's output transform, unless its last Dense says
        "softmax" (that activation is the transform already)."""
        if self.blocks and self.blocks[-1].dense["activation"] == "softmax":
            return None
        return output_transform(self.loss)


def _read_part(name, where, configs, weights, loss):
    """The Part `name` from layer configs and an iterator over the model's get_weights();
    `where` names it in errors."""
    def take(n):
        arrays = [next(weights, None) for _ in range(n)]
        if any(a is None for a in arrays):
            raise ValueError(f"{where}: the model's get_weights() holds fewer arrays than its "
                             f"layers need; fastreg.export does not know this layout")
        return arrays

    before, blocks = [], []
    for cfg in configs:
        kind = cfg.get("class")
        if kind == "Dense":
            W, b = take(2)
            from .regularizers import activity_strengths, from_config
            activity = activity_strengths([from_config(r) for r in
                                           cfg.get("activity_regularizer", [])])
            blocks.append(Block(cfg, None, [], W, b, None, activity))
        elif kind == "ActivityRegularization":    # folded onto the Dense before it
            blocks[-1].activity = (blocks[-1].activity[0] + cfg["l1"],
                                   blocks[-1].activity[1] + cfg["l2"])
        elif kind == "BatchNorm":
            if not blocks or blocks[-1].bn is not None or blocks[-1].train_only:
                raise ValueError(f"{where}: a BatchNorm must follow a Dense directly")
            blocks[-1].bn = cfg
            blocks[-1].bn_arrays = tuple(take(4))
        elif kind in ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout"):
            (blocks[-1].train_only if blocks else before).append(cfg)
        else:
            raise ValueError(f"{where}: cannot export a layer of class {kind!r}")
    for blk in blocks:
        if blk.dense["activation"] not in ACTIVATIONS:
            raise ValueError(f"{where}: no export for activation {blk.dense['activation']!r}; "
                             f"add it to fastreg.export.ACTIVATIONS")
        if blk.dense.get("dropout", 0.0):        # a Dense's own dropout= comes last
            blk.train_only.append({"class": "Dropout", "rate": blk.dense["dropout"]})
    return Part(name, before, blocks, loss)


def read_model(model):
    """(input_dim, [Part, ...], multitask) of a built fr.Sequential or fr.MultiTask."""
    from .model import Sequential
    from .multitask import MultiTask
    if not isinstance(model, (Sequential, MultiTask)):
        raise TypeError(f"export takes a fastreg Sequential or MultiTask, got "
                        f"{type(model).__name__}")
    if model.input_dim is None:
        raise ValueError("the model has no weights yet: fit it or pass input_dim before "
                         "exporting")
    weights = iter(model.get_weights())
    if isinstance(model, MultiTask):
        parts = [_read_part("trunk", "the trunk",
                            [la.get_config() for la in model.trunk_layers], weights, None)]
        parts += [_read_part(h, f"head {h!r}", [la.get_config() for la in model.head_layers(h)],
                             weights, model.losses[h]) for h in model.head_names]
    else:
        parts = [_read_part("output", "the model", [la.get_config() for la in model.layers],
                            weights, model.loss)]
    if next(weights, None) is not None:
        raise ValueError("the model's get_weights() holds more arrays than its layers "
                         "explain; fastreg.export does not know this layout")
    return int(model.input_dim), parts, isinstance(model, MultiTask)


# ---------------------------------------------------------------- ONNX
def _need(module, extra):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this export needs {module}: pip install {extra} "
                          f"({module} said: {exc})") from exc


def to_onnx(model, opset=None):
    """The model's inference graph as an onnx.ModelProto (checked by onnx.checker)."""
    onnx = _need("onnx", "\"fastreg[onnx]\"")
    from onnx import TensorProto, helper, numpy_helper
    opset = ONNX_OPSET if opset is None else int(opset)
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (Softmax over one axis), got {opset}")
    input_dim, parts, multitask = read_model(model)
    nodes, inits = [], []

    def stack(part, x, prefix, final):
        for i, blk in enumerate(part.blocks):
            W, b = blk.folded(np.float32)
            name = f"{prefix}dense_{i}"
            inits.append(numpy_helper.from_array(W, f"{name}/W"))
            z = f"{name}/z"
            if b is not None:
                inits.append(numpy_helper.from_array(b, f"{name}/b"))
                nodes.append(helper.make_node("Gemm", [x, f"{name}/W", f"{name}/b"], [z],
                                              name=f"{name}/gemm"))
            else:
                nodes.append(helper.make_node("MatMul", [x, f"{name}/W"], [z],
                                              name=f"{name}/matmul"))
            x = z
            act = ACTIVATIONS[blk.dense["activation"]]
            if act is not None:
                x = _onnx_nodes(act, helper, nodes, x, f"{name}/{blk.dense['activation']}",
                                blk.dense)
        transform = part.transform
        if transform is not None:
            x = _onnx_nodes(transform, helper, nodes, x, f"{prefix}probabilities", {})
        nodes.append(helper.make_node("Identity", [x], [final], name=f"{final}/identity"))
        return final

    outputs = []
    if multitask:
        trunk = stack(parts[0], "input", "trunk/", "trunk/output")
        for part in parts[1:]:
            stack(part, trunk, f"heads/{part.name}/", part.name)
            outputs.append((part.name, part.blocks[-1].dense["units"]))
    else:
        stack(parts[0], "input", "", "output")
        outputs.append(("output", parts[0].blocks[-1].dense["units"]))
    graph = helper.make_graph(
        nodes, "fastreg", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                         ["N", input_dim])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", units])
         for name, units in outputs],
        initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="fastreg",
                              doc_string=f"fastreg {type(model).__name__} inference graph")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _onnx_nodes(act, helper, nodes, x, out, cfg):
    nodes.extend(act.onnx(helper, x, out, cfg))
    return out


def export(model, path, format="onnx", opset=None):
    """Write the model's ONNX inference graph to `path`; returns the path."""
    if format != "onnx":
        raise ValueError(f"unknown export format {format!r}: export writes 'onnx'; "
                         f"to_keras() and to_torch() give the peer models")
    onnx = _need("onnx", "\"fastreg[onnx]\"")
    proto = to_onnx(model, opset)
    path = os.fspath(path)
    onnx.save(proto, path)
    return path


# ---------------------------------------------------------------- Keras
def to_keras(model):
    """The equivalent Keras 3 model: keras.Sequential for a Sequential, a functional
    keras.Model with one output per head (a dict) for a MultiTask."""
    keras = _need("keras", "keras and a backend (tensorflow; or jax or torch with "
                           "KERAS_BACKEND=jax / torch set before keras is imported)")
    input_dim, parts, multitask = read_model(model)
    dtype = np.dtype(model.dtype).name

    def layers_of(part, prefix):
        out = [_keras_train_only(keras, c, f"{prefix}input_{j}", dtype)
               for j, c in enumerate(part.input_train_only)]
        for i, blk in enumerate(part.blocks):
            d = blk.dense
            dense = keras.layers.Dense(d["units"], use_bias=d["use_bias"],
                                       name=f"{prefix}dense_{i}", dtype=dtype)
            out.append((dense, [blk.W] + ([blk.b] if d["use_bias"] else [])))
            if blk.bn is not None:
                bn = keras.layers.BatchNormalization(momentum=blk.bn["momentum"],
                                                     epsilon=blk.bn["eps"],
                                                     name=f"{prefix}batchnorm_{i}",
                                                     dtype=dtype)
                out.append((bn, list(blk.bn_arrays)))
            act = ACTIVATIONS[d["activation"]]
            if act is not None:
                out.append(act.keras(keras, d, f"{prefix}{d['activation']}_{i}"))
            if any(blk.activity):   # on the activation's output, before noise and dropout
                out.append(keras.layers.ActivityRegularization(
                    l1=blk.activity[0], l2=blk.activity[1], name=f"{prefix}activity_{i}",
                    dtype=dtype))
            out += [_keras_train_only(keras, c, f"{prefix}dense_{i}_{j}", dtype)
                    for j, c in enumerate(blk.train_only)]
        transform = part.transform
        if transform is not None:
            out.append(transform.keras(keras, {}, f"{prefix}probabilities"))
        return out

    def apply(layers, x):
        for entry in layers:
            layer = entry[0] if isinstance(entry, tuple) else entry
            x = layer(x)
        return x

    def load(layers):
        for entry in layers:
            if isinstance(entry, tuple):
                layer, arrays = entry
                layer.set_weights([np.asarray(a) for a in arrays])

    inputs = keras.Input((input_dim,), name="input", dtype=dtype)
    if multitask:
        trunk = layers_of(parts[0], "trunk_")
        heads = {p.name: layers_of(p, f"head_{p.name}_") for p in parts[1:]}
        h = apply(trunk, inputs)
        peer = keras.Model(inputs, {name: apply(ls, h) for name, ls in heads.items()},
                           name="fastreg_multitask")
        for ls in [trunk] + list(heads.values()):
            load(ls)
    else:
        layers = layers_of(parts[0], "")
        peer = keras.Sequential([inputs] + [e[0] if isinstance(e, tuple) else e
                                            for e in layers], name="fastreg_sequential")
        load(layers)
    return peer


def _keras_train_only(keras, cfg, name, dtype):
    kind = cfg["class"]
    if kind == "Dropout":
        return keras.layers.Dropout(cfg["rate"], name=name, dtype=dtype)
    if kind == "GaussianNoise":
        return keras.layers.GaussianNoise(cfg["stddev"], name=name, dtype=dtype)
    if kind == "AlphaDropout":
        return keras.layers.AlphaDropout(cfg["rate"], name=name, dtype=dtype)
    return keras.layers.GaussianDropout(cfg["rate"], name=name, dtype=dtype)


# ---------------------------------------------------------------- PyTorch
def to_torch(model):
    """The equivalent torch.nn.Module in eval mode, in the model's dtype: a torch.nn.Sequential
    for a Sequential; for a MultiTask a module whose forward returns {head: tensor}."""
    torch = _need("torch", "torch")
    from . import _torch_peer as torch_peer
    nn = torch.nn
    _, parts, multitask = read_model(model)
    dtype = {np.dtype(np.float32): torch.float32,
             np.dtype(np.float64): torch.float64}[np.dtype(model.dtype)]

    def tensor(a):
        return torch.from_numpy(np.array(a, copy=True)).to(dtype)

    def sequential(part):
        mods = [_torch_train_only(torch_peer, nn, c) for c in part.input_train_only]
        for blk in part.blocks:
            d = blk.dense
            lin = nn.Linear(blk.W.shape[0], blk.W.shape[1], bias=d["use_bias"], dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(tensor(blk.W.T))
                if d["use_bias"]:
                    lin.bias.copy_(tensor(blk.b))
            mods.append(lin)
            if blk.bn is not None:
                bn = nn.BatchNorm1d(blk.W.shape[1], eps=blk.bn["eps"],
                                    momentum=1.0 - blk.bn["momentum"], dtype=dtype)
                gamma, beta, mean, var = blk.bn_arrays
                with torch.no_grad():
                    bn.weight.copy_(tensor(gamma))
                    bn.bias.copy_(tensor(beta))
                    bn.running_mean.copy_(tensor(mean))
                    bn.running_var.copy_(tensor(var))
                mods.append(bn)
            act = ACTIVATIONS[d["activation"]]
            if act is not None:
                mods.append(act.torch(nn, d))
            mods += [_torch_train_only(torch_peer, nn, c) for c in blk.train_only]
        transform = part.transform
        if transform is not None:
            mods.append(transform.torch(nn, {}))
        return nn.Sequential(*mods)

    if multitask:
        peer = torch_peer.MultiHead(sequential(parts[0]),
                                    {p.name: sequential(p) for p in parts[1:]})
    else:
        peer = sequential(parts[0])
    return peer.eval()


def _torch_train_only(torch_peer, nn, cfg):
    kind = cfg["class"]
    if kind == "Dropout":
        return nn.Dropout(cfg["rate"])
    if kind == "GaussianNoise":
        return torch_peer.GaussianNoise(cfg["stddev"])
    if kind == "AlphaDropout":
        return nn.AlphaDropout(cfg["rate"])
    return torch_peer.GaussianDropout(cfg["rate"])


__all__ = ["to_onnx", "export", "to_keras", "to_torch", "ACTIVATIONS", "OUTPUT_TRANSFORMS"]
