"""The Cython CPU backend (``backend="cython"``): the kernel contract compiled ahead of time.

Shape legend: B batch rows, I fan_in, O fan_out, K outputs.

The same functions and signatures as kernels/cpu.py (the Numba backend), float32 and float64,
computed by the C extension ``fastreg.kernels.cython_kernels`` (kernels/cython_kernels.pyx):
no JIT, so the first epoch is as fast as the others. ``train_epoch`` runs the whole epoch in
C without the GIL, step for step like kernels/driver.py; its raw pointers into the Net's
buffers are prepared once and kept in ``net.cache``.

The extension is optional. Importing this module raises ImportError (one sentence saying how
to get it) when it was not built, or when ``FASTREG_NO_CYTHON=1`` asks to run without it
(CI runs the suite both ways).
"""
import os

import numpy as np

from . import contract as C
from . import driver, threads

NAME = "cython"

_HOW = ("the Cython kernels are not built: reinstall with `pip install -e .` where a C "
        "compiler and Cython are available (the install log says why the build was skipped)")

if os.environ.get("FASTREG_NO_CYTHON") == "1":
    raise ImportError("the Cython kernels are switched off by FASTREG_NO_CYTHON=1: unset it "
                      "to use backend='cython'")
# Our OpenMP passes run between OpenBLAS calls: with libgomp's default (spinning) wait policy
# its idle threads burn the cores OpenBLAS needs next (measured on 2 cores, 784-1024-1024-10
# epoch: 3.5 s unset, 1.25 s passive; Numba's omp layer shares libgomp and gains as much).
# Passive waiting costs a wake-up per parallel pass instead. libgomp reads this once when it
# loads (importing the extension loads it, unless something did before); a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    from . import cython_kernels as _K
except ImportError as _exc:
    raise ImportError(_HOW) from _exc


def _check_contract():
    """The codes compiled into the extension must still be contract.py's (no stale build)."""
    codes = getattr(_K, "CONTRACT", None)
    if codes is None or not hasattr(_K, "EpochPlan"):
        raise ImportError("the Cython kernels are out of date: rebuild them with "
                          "`pip install -e .`")
    for name, value in codes.items():
        if name.startswith("STREAM_"):
            from_py = {"STREAM_DROPOUT": 0, "STREAM_INPUT_DROPOUT": 1, "STREAM_NOISE": 2,
                       "STREAM_INPUT_NOISE": 9}[name]
        elif name == "PARALLEL_MIN_ELEMENTS":
            continue
        else:
            from_py = getattr(C, name)
        if from_py != value:
            raise ImportError("the Cython kernels are out of date with kernels/contract.py "
                              f"({name}): rebuild them with `pip install -e .`")


_check_contract()

OPENMP = _K.OPENMP  # False for a serial build (no OpenMP at compile time)
_MASK32 = 0xFFFFFFFF


def split_seed(seed):
    """The 64-bit seed as the two Philox key words (low, high); as kernels/philox.py."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _MASK32, seed >> 32


# ---------------------------------------------------------------- Philox (tests, tools)
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of one counter with the C loop the kernels use; four uint32 words."""
    return _K.philox4x32(c0, c1, c2, c3, k0, k1)


def philox_words(n, seed, step, layer, stream):
    """The first n words of the (seed, step, layer, stream) sequence, element-indexed."""
    words = np.empty(4 * max(1, (int(n) + 3) // 4), np.uint32)
    k0, k1 = split_seed(seed)
    _K.philox_fill(words, int(n), k0, k1, int(step), int(layer), int(stream))
    return words[:n].copy()


# ---------------------------------------------------------------- the contract (per op)
def _pre(pre, out):
    return out[:0] if pre is None or pre.size == 0 else pre


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    _K.dense_forward(x, W, b, out, int(act), float(slope), int(drop_threshold),
                     float(out.dtype.type(drop_scale)), k0, k1, int(step), int(layer),
                     int(noise), float(out.dtype.type(noise_std)), _pre(pre, out))


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    if dx.size == 0:
        dx = grad[:0]
    _K.dense_backward(grad, out, x, W, dW, db, dx, int(act), float(slope),
                      int(drop_threshold), float(out.dtype.type(drop_scale)), k0, k1, int(step),
                      int(layer), int(noise), float(out.dtype.type(noise_std)), _pre(pre, out))


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    _K.bn_dense_forward(x, W, b, out, xhat, gb, save, int(act), float(slope),
                        int(drop_threshold), float(dt(drop_scale)), float(dt(eps)), k0, k1,
                        int(step), int(layer), int(noise), float(dt(noise_std)),
                        _pre(pre, out))


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    if dx.size == 0:
        dx = grad[:0]
    _K.bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, int(act),
                         float(slope), int(drop_threshold), float(dt(drop_scale)),
                         float(dt(momentum)), k0, k1, int(step), int(layer), int(noise),
                         float(dt(noise_std)), _pre(pre, out))


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=C.NOISE_NONE,
                  noise_std=0.0):
    k0, k1 = split_seed(seed)
    _K.input_dropout(x, out, int(threshold), float(x.dtype.type(scale)), k0, k1, int(step),
                     int(layer), int(noise), float(x.dtype.type(noise_std)))


def loss_forward_backward(logits, y, grad, loss):
    return _K.loss_forward_backward(logits, np.ascontiguousarray(y, logits.dtype), grad,
                                    int(loss), True)


def loss_value(logits, y, loss):
    return _K.loss_forward_backward(logits, np.ascontiguousarray(y, logits.dtype), logits[:0],
                                    int(loss), False)


def penalized_update(w, g, m, v, hp, opt, t):
    return _K.penalized_update(w, g, m, v, hp, int(opt), int(t))


def output_transform(logits, loss):
    """What predict returns: probabilities for the cross-entropies, the values for mse.

    The reference's formulas, in NumPy (importing kernels/reference would import Numba).
    """
    if loss == C.LOSS_BCE:
        e = np.exp(-np.abs(logits))
        return np.where(logits >= 0, 1 / (1 + e), e / (1 + e)).astype(logits.dtype)
    if loss == C.LOSS_SCE:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return logits


# ---------------------------------------------------------------- epoch / inference entry
def _plan(net):
    """Pointers into the Net's buffers, built once per workspace and checked each call."""
    driver.ensure_bn_lists(net)
    plan = net.cache.get("cython_plan")
    if plan is None or not plan.matches(net):
        plan = _K.EpochPlan(net, split_seed(net.seed))
        net.cache["cython_plan"] = plan
    else:
        plan.refresh(net)
    return plan


def train_epoch(net, X, Y, perm, batch_size, step0, t0):
    """One epoch (or a chunk of whole batches: the rows `perm`) in C; returns
    (loss_sum, penalty_sum, steps, finite) like kernels/driver.train_epoch."""
    with threads.openmp_epoch(net, _K.openmp_threads):
        return _K.train_epoch(_plan(net), X, Y, perm, int(batch_size), int(step0), int(t0))


def forward_inference(net, X, batch_size):
    """Logits for X with dropout off, in chunks of `batch_size` rows."""
    return _K.forward_inference(list(net.Ws), list(net.bs), net.li, net.lf, X,
                                int(batch_size))


# Keep the Python driver importable from here too, as kernels/cpu.py does.
driver_train_epoch = driver.train_epoch
