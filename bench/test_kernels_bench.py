"""pytest-benchmark suites for the kernels at the built-in workloads' shapes, on every
backend that runs here (numpy, numba, cython).

Run: pytest bench/ --benchmark-only   (not part of the test suite: no timing is asserted)
"""
import numpy as np
import pytest

from fastreg import backend as backends
from fastreg.kernels import contract
from fastreg.kernels.philox import dropout_scale, dropout_threshold


def _available(names):
    out = {}
    for name in names:
        try:
            out[name] = backends.resolve(name)
        except backends.BackendUnavailable:
            pass
    return out


BACKENDS = _available(["numpy", "numba", "cython"])
# (batch, fan_in, fan_out, activation, dropout) of the hidden layers of curve and wide
SHAPES = {"curve-64x64": (128, 64, 64, contract.ACT_LEAKY_RELU, 0.1),
          "wide-784x1024": (256, 784, 1024, contract.ACT_RELU, 0.2),
          "wide-1024x1024": (256, 1024, 1024, contract.ACT_RELU, 0.2)}


def _layer(shape):
    B, I, O, act, rate = shape
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((B, I)).astype(np.float32),
                W=(rng.standard_normal((I, O)) / np.sqrt(I)).astype(np.float32),
                b=rng.standard_normal(O).astype(np.float32),
                out=np.zeros((B, O), np.float32), act=act, thr=dropout_threshold(rate),
                scale=dropout_scale(rate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_forward(benchmark, backend, shape):
    k, L = BACKENDS[backend], _layer(SHAPES[shape])
    benchmark(k.dense_forward, L["x"], L["W"], L["b"], L["out"], L["act"], 0.01, L["thr"],
              L["scale"], 1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_backward(benchmark, backend, shape):
    k, L = BACKENDS[backend], _layer(SHAPES[shape])
    k.dense_forward(L["x"], L["W"], L["b"], L["out"], L["act"], 0.01, L["thr"], L["scale"],
                    1, 0, 0)
    g = np.ones_like(L["out"])
    dW, db, dx = np.zeros_like(L["W"]), np.zeros_like(L["b"]), np.zeros_like(L["x"])
    benchmark(k.dense_backward, g, L["out"], L["x"], L["W"], dW, db, dx, L["act"], 0.01,
              L["thr"], L["scale"], 1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_adam_update(benchmark, backend, shape):
    k, L = BACKENDS[backend], _layer(SHAPES[shape])
    hp = np.zeros(contract.HP_SIZE)
    hp[[contract.HP_LR, contract.HP_BETA1, contract.HP_BETA2,
        contract.HP_EPS, contract.HP_L2]] = (1e-3, 0.9, 0.999, 1e-8, 1e-4)
    g = np.ones_like(L["W"])
    m, v = np.zeros_like(L["W"]), np.zeros_like(L["W"])
    benchmark(k.penalized_update, L["W"], g, m, v, hp, contract.OPT_ADAM, 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_mask(benchmark, backend, shape):
    """Philox words + mask for one layer's output (what backward regenerates)."""
    B, _, O, _, rate = SHAPES[shape]
    benchmark(BACKENDS[backend].philox_words, B * O, 1, 0, 0, contract.STREAM_DROPOUT)
