"""The CUDA backend ("cuda", numba-cuda): the kernel contract on the GPU, and a device-resident
epoch. The twin of kernels/reference and kernels/numba (same module names, same signatures,
the same Philox masks bit for bit, results equal to float32 rounding).

    philox     Philox words and normals            activation f and f' of every activation
    epilogue   bias, activation, noise, mask       dense      tiled GEMM + fused epilogue
    batchnorm  the BatchNorm dense layer
    loss       losses from logits, the status      update     the fused penalized update
    epoch      the device-resident plan, epochs    fused      the fused small-MLP path
    fused_epoch  its weight gradients, one-launch epoch
    jit        numba-cuda, builders, namespaces    ptxcheck   every kernel compiled to PTX
    bench      epoch timings on a GPU (python -m fastreg.kernels.cuda.bench)

The per-op contract takes host NumPy arrays (copy in, run, copy out: for tests and the
reference's epoch); `train_epoch` / `forward_inference` take a plan (kernels/plan.py) and
keep its state on the device (plan.cache["cuda"], state.DevicePlan) until sync_to_host.
Paths and launches: kernels/cuda/epoch.py. Kernels are built per (dtype, tiles) by the
modules' `build(ns)` functions (jit.py) and compiled by NVVM on first use, about 10-20 s
per dtype; ptxcheck.py compiles them all to PTX without a GPU, so typing errors the
simulator cannot see are caught in CI. Reductions are deterministic (fixed order) except
the penalty sum (float64 atomics).
"""
import numpy as np

from .. import contract
from ..philox import split_seed
from ..reference import output_transform as _reference_output_transform
from ..reference import penalty_value as _reference_penalty_value
from ..reference.loss import loss_param
from . import batchnorm, dense, epoch, state, update
from .dense import Epilogue
from .jit import IMPORT_ERROR as _IMPORT_ERROR
from .jit import cuda, grid1, kernels, on_simulator, to_dev  # noqa: F401 (tests patch cuda)
from .loss import ST_PEN, batch_slot, status_size
from .philox import counters_device, stream_words_device

NAME = "cuda"

if cuda is not None:
    try:    # numba-cuda's own copy of the compile events (absent in older releases)
        import numba.cuda.core.event as _cuda_event
        from .. import compile_notice
        compile_notice.install(_cuda_event, "numba-cuda", "numba-cuda:compile")
    except (ImportError, ValueError):  # pragma: no cover - depends on the release
        pass

# ---------------------------------------------------------------- tunables (patchable)
TILE_M = 64        # output rows per GEMM block
TILE_N = 64        # output columns per GEMM block
TILE_K = 16        # inner-dimension depth of one shared-memory stage
THREAD_M = 4       # micro-tile rows per thread
THREAD_N = 4       # micro-tile columns per thread  -> (64/4) * (64/4) = 256 threads
BLOCK = 256        # threads of the elementwise / reduction kernels (a power of two)
UPDATE_PER_THREAD = 8      # parameters per thread of the fused update (chunk = BLOCK * this)
CUBLAS_MIN_MACS = 1 << 22  # from this many multiply-adds on, cuBLAS + epilogue kernel
FORCE_SPLIT = False        # tests: take the "GEMM then epilogue" path with our own GEMM
# The fully fused small-MLP path (kernels/cuda/fused.py): single-part plans no wider than
# FUSED_MAX_WIDTH and without BatchNorm train in 3 launches per step; 0 turns it off.
FUSED_MAX_WIDTH = 128      # widest input / fan_in / fan_out it takes (shared-memory rows)
FUSED_ROWS = 32            # batch rows per block (float64: half, to fit 48 KiB of shared)
FUSED_THREADS = 256        # threads per block: 8 warps, 2 per scheduler, to hide latency when
                           # one block runs the epoch alone on its SM
FUSED_TK = 16              # weight rows per shared-memory stage (float64: half)
FUSED_THREAD_M = 2         # micro-tile rows per thread: 2 x 4 keeps all 256 threads busy on
FUSED_THREAD_N = 4         # a 32 x 64 layer tile
# Fused plans whose step is at most this many multiply-adds (batch x sum(I*O) x 3: forward,
# backward deltas, weight gradients) train a whole epoch in ONE launch of one block
# (fused_epoch.py): a launch from Python costs tens of microseconds, about what one SM needs
# for this much arithmetic. Bigger steps take the 3-launch multi-block path. A first guess,
# to calibrate on a GPU (python -m fastreg.kernels.cuda.bench reports both). Like
# FUSED_MAX_WIDTH, read when a plan's device state is built (invalidate(plan) re-decides).
FUSED_EPOCH_MAX_MACS = 1 << 23


def available():
    """(True, "") when this backend can run here, else (False, one sentence saying why)."""
    if cuda is None:
        return False, ("numba-cuda could not be imported ({}); install it with "
                       "pip install \"fastreg[cuda]\"".format(_IMPORT_ERROR))
    if on_simulator():
        return True, "running on the numba-cuda simulator (NUMBA_ENABLE_CUDASIM=1): slow"
    try:
        ok = bool(cuda.is_available())
    except Exception:  # pragma: no cover - driver-level failures
        ok = False
    if not ok:
        return False, ("no CUDA GPU or driver was found by numba-cuda; run on a machine with an "
                       "NVIDIA GPU (or set NUMBA_ENABLE_CUDASIM=1 for the slow simulator)")
    return True, ""


def require():
    ok, reason = available()
    if not ok:
        raise RuntimeError("the cuda backend is not available: " + reason)


# ---------------------------------------------------------------- the contract (per op)
def _bias(ns, b):
    return (to_dev(b), 1) if b.size else (ns.dummy1, 0)


def _stored(ns, act, noise, out, pre):
    """What f' reads in backward (dense.Epilogue.stored): the pre buffer where the layer
    keeps one, else its output (unread with noise on a linear layer)."""
    if contract.keeps_pre(act, noise):
        return to_dev(pre)
    return ns.dummy if int(noise) != contract.NOISE_NONE else to_dev(out)


def _output_grad(ns, gd, out, act, slope, thr, scale, k0, k1, step, layer, noise, nstd, pre,
                 activity_l1=0.0, activity_l2=0.0):
    """dL/d(out) -> dL/d(f's input) in place on the device copy gd of the gradient; returns
    the activity penalty (l1 sum |a| + l2 sum a^2) / B of a layer with one (epoch.activity_grad),
    else 0."""
    dt = ns.dtype.type
    epi = Epilogue(_stored(ns, act, noise, out, pre), int(act), dt(slope), int(thr), dt(scale),
                   int(layer), int(noise), dt(nstd))
    if not (activity_l1 or activity_l2):
        dense.output_grad(ns, gd, epi, k0, k1, int(step))
        return 0.0
    status = cuda.to_device(np.zeros(status_size(1)))
    kept = to_dev(pre) if pre is not None and pre.size else None
    epoch.activity_grad(ns, gd, to_dev(out), kept, epi,
                        (float(dt(activity_l1)), float(dt(activity_l2))), k0, k1, int(step),
                        status)
    return float(status.copy_to_host()[ST_PEN]) / max(1, out.shape[0])


def _kept(act, noise, pre):
    """Whether the forward writes a pre buffer: f' needs one, or the caller gives one (a
    layer with an activity penalty under dropout: contract.keeps_pre)."""
    return contract.keeps_pre(act, noise) or (pre is not None and pre.size > 0)


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=contract.NOISE_NONE, noise_std=0.0, pre=None):
    ns = kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    bd, hb = _bias(ns, b)
    od = cuda.device_array(out.shape, out.dtype)
    pd = cuda.device_array(out.shape, out.dtype) if _kept(act, noise, pre) else None
    dense.forward(ns, to_dev(x), to_dev(W), bd, hb, od, int(act), dt(slope),
                  int(drop_threshold), dt(drop_scale), k0, k1, int(step), int(layer),
                  int(noise), dt(noise_std), pd)
    out[...] = od.copy_to_host()
    if pd is not None and pre is not None and pre.size:
        pre[...] = pd.copy_to_host()


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None,
                   activity_l1=0.0, activity_l2=0.0):
    ns = kernels(out.dtype)
    k0, k1 = split_seed(seed)
    gd = to_dev(grad)
    pen = _output_grad(ns, gd, out, act, slope, drop_threshold, drop_scale, k0, k1, step,
                       layer, noise, noise_std, pre, activity_l1, activity_l2)
    dWd = cuda.device_array(dW.shape, dW.dtype)
    has_bias = db.size > 0
    dbd = cuda.device_array(db.shape, db.dtype) if has_bias else ns.dummy1
    dxd = cuda.device_array(dx.shape, dx.dtype) if dx.size else None
    dense.backward(ns, gd, to_dev(x), to_dev(W), dWd, dbd, has_bias, dxd, None, k0, k1,
                   int(step))
    grad[...] = gd.copy_to_host()
    dW[...] = dWd.copy_to_host()
    if has_bias:
        db[...] = dbd.copy_to_host()
    if dxd is not None:
        dx[...] = dxd.copy_to_host()
    return pen


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None):
    ns = kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    bd, hb = _bias(ns, b)
    od = cuda.device_array(out.shape, out.dtype)
    xd = cuda.device_array(xhat.shape, xhat.dtype)
    sd = cuda.to_device(np.ascontiguousarray(save, np.float64))
    pd = cuda.device_array(out.shape, out.dtype) if _kept(act, noise, pre) else None
    batchnorm.forward(ns, to_dev(x), to_dev(W), bd, hb, od, xd, to_dev(gb), sd, int(act),
                      dt(slope), int(drop_threshold), dt(drop_scale), float(dt(eps)), k0, k1,
                      int(step), int(layer), int(noise), dt(noise_std), pd)
    out[...] = od.copy_to_host()
    xhat[...] = xd.copy_to_host()
    save[...] = sd.copy_to_host()
    if pd is not None and pre is not None and pre.size:
        pre[...] = pd.copy_to_host()


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=contract.NOISE_NONE, noise_std=0.0, pre=None, activity_l1=0.0,
                      activity_l2=0.0):
    ns = kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    gd = to_dev(grad)
    pen = _output_grad(ns, gd, out, act, slope, drop_threshold, drop_scale, k0, k1, step,
                       layer, noise, noise_std, pre, activity_l1, activity_l2)
    has_bias = db.size > 0
    dbd = to_dev(db) if has_bias else ns.dummy1
    dgbd = cuda.device_array(dgb.shape, dgb.dtype)
    std = to_dev(stats)
    status = cuda.to_device(np.zeros(status_size(1)))
    batchnorm.backward(ns, gd, to_dev(xhat), to_dev(gb), to_dev(save), dgbd, dbd,
                       1 if has_bias else 0, std, float(dt(momentum)), status)
    dWd = cuda.device_array(dW.shape, dW.dtype)
    dxd = cuda.device_array(dx.shape, dx.dtype) if dx.size else None
    dense.backward(ns, gd, to_dev(x), to_dev(W), dWd, ns.dummy1, False, dxd, None, k0, k1,
                   int(step))
    grad[...] = gd.copy_to_host()
    dW[...] = dWd.copy_to_host()
    dgb[...] = dgbd.copy_to_host()
    stats[...] = std.copy_to_host()
    if has_bias:
        db[...] = dbd.copy_to_host()
    if dxd is not None:
        dx[...] = dxd.copy_to_host()
    return pen


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=contract.NOISE_NONE,
                  noise_std=0.0):
    ns = kernels(x.dtype)
    k0, k1 = split_seed(seed)
    od = cuda.device_array(x.shape, x.dtype)
    ns.input_dropout[grid1(x.size, ns.NB), ns.NB](to_dev(x), od, int(threshold),
                                                  x.dtype.type(scale), k0, k1, int(step),
                                                  int(layer), int(noise),
                                                  x.dtype.type(noise_std))
    out[...] = od.copy_to_host()


def weight_noise(W, out, std, seed, step, layer):
    ns = kernels(W.dtype)
    k0, k1 = split_seed(seed)
    od = cuda.device_array(W.shape, W.dtype)
    ns.weight_noise[grid1(W.size, ns.NB), ns.NB](to_dev(W), od, W.dtype.type(std), k0, k1,
                                                 int(step), int(layer))
    out[...] = od.copy_to_host()


def _loss(logits, y, grad, loss, param):
    ns = kernels(logits.dtype)
    z = ns.ZERO
    status = cuda.to_device(np.zeros(status_size(1)))
    gd = cuda.device_array(logits.shape, logits.dtype) if grad is not None else ns.dummy
    ns.loss_kernel[1, ns.NB](to_dev(logits), to_dev(y.astype(logits.dtype, copy=False)), 0,
                             y.shape[1], -1, gd, int(loss), loss_param(loss, param),
                             grad is not None, ns.ONE, status, 0, 1, True, False, 1.0,
                             contract.ACT_LINEAR, z, 0, z, 0, 0, 0, 0)
    if grad is not None:
        grad[...] = gd.copy_to_host()
    return float(status.copy_to_host()[batch_slot(0)])


def loss_forward_backward(logits, y, grad, loss, param=None):
    return _loss(logits, y, grad, loss, param)


def loss_value(logits, y, loss, param=None):
    return _loss(logits, y, None, loss, param)


def penalized_update(w, g, m, v, hp, opt, t):
    """One tensor through the same fused update (and column) kernels as train_epoch."""
    ns = kernels(w.dtype)
    hp = np.asarray(hp, np.float64)
    tab = update.segment_tables(ns, [(0, w.shape, hp, w.ndim == 2)], m.size > 0)
    Pd = to_dev(w.reshape(-1))
    Md = to_dev(m.reshape(-1)) if m.size else ns.dummy1
    Vd = to_dev(v.reshape(-1)) if v.size else ns.dummy1
    status = cuda.to_device(np.zeros(status_size(1)))
    update.launch(ns, tab, Pd, to_dev(g.reshape(-1)), Md, Vd, int(opt), int(t), status, 1.0)
    w[...] = Pd.copy_to_host().reshape(w.shape)
    if m.size:
        m[...] = Md.copy_to_host().reshape(m.shape)
    if v.size:
        v[...] = Vd.copy_to_host().reshape(v.shape)
    return float(status.copy_to_host()[ST_PEN])


def penalty_value(w, hp):
    return _reference_penalty_value(w, hp)


def output_transform(logits, loss):
    return _reference_output_transform(logits, loss)


def philox_words(n, seed, step, layer, stream):
    """The first n words of the (seed, step, layer, stream) sequence, from the device."""
    return stream_words_device(n, seed, step, layer, stream)


def philox_counters(counters, key):
    """Philox4x32-10 of an (n, 4) array of counters on the device (known-answer tests)."""
    return counters_device(counters, key)


# ---------------------------------------------------------------- plans on the device
def _state(plan):
    """The plan's device state (state.DevicePlan), built on first use."""
    st = plan.cache.get("cuda")
    if st is None:
        st = state.DevicePlan(plan, kernels(plan.dtype))
        plan.cache["cuda"] = st
    return st


def sync_to_host(plan):
    """Copy the device parameters, moments and running statistics into the plan's store."""
    st = plan.cache.get("cuda")
    if st is not None:
        st.sync_to_host(plan)


def invalidate(plan):
    """Drop the device copies: the next call re-uploads the (user-changed) host buffers."""
    plan.cache.pop("cuda", None)


def train_epoch(plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None):
    """kernels/reference/epoch.py on the device: same steps, same order, same masks, step k
    with learning rate lrs[k] (Plan.step_rates). Returns (loss sums per part, penalty sum,
    steps, finite); the parameters stay on the device until sync_to_host(plan)."""
    k0, k1 = split_seed(plan.seed)
    lrs = plan.step_rates(len(perm), batch_size, lrs)
    zout = plan.logits_out(len(perm), zout)
    return epoch.train_epoch(_state(plan), plan, X, Y, perm, int(batch_size), int(step0),
                             int(t0), k0, k1, lrs, zout)


def forward_inference(plan, X, batch_size, part=0):
    """Logits of part `part` of an inference plan for X (that part's input); parameters
    uploaded once per plan."""
    return epoch.forward_inference(_state(plan), plan, X, batch_size, part)
