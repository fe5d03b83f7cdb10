"""The Numba CPU backend ("numba"): the kernel contract as @njit functions, and one compiled
epoch. The twin of kernels/reference (same module names, same signatures, same masks).

    philox     Philox words and normals            activation f and f' of every activation
    epilogue   bias, activation, noise, mask       dense      GEMM + epilogue
    batchnorm  the BatchNorm dense layer
    loss       losses from logits                  update     the fused penalized update
    epoch      the compiled epoch and inference    jit        flags, specialization, cache

The functions here are the entry points Python calls: each is compiled with cache=True,
its disk cache tied to the whole backend's sources (jit.SOURCE_STAMP), and compiles, on
first use, only the activations, update variants and features its network uses.
"""
import os

import numpy as np
from numba import njit
from numba.core import event as _numba_event
from numba.typed import List

from .. import compile_notice, contract, threads
from ..philox import split_seed
from ..reference.loss import loss_param
from . import epoch
from .batchnorm import bn_dense_backward as _bn_dense_backward
from .batchnorm import bn_dense_forward as _bn_dense_forward
from .dense import dense_backward as _dense_backward
from .dense import dense_forward as _dense_forward
from .activation import activations_used
from .dense import weight_noise as _weight_noise
from .epilogue import ELEM_CHUNK
from .epilogue import input_dropout as _input_dropout
from .jit import ENTRY_FLAGS, SOURCE_STAMP, uses_of
from .loss import loss_of as _loss_of, loss_uses
from .philox import philox_fill as _philox_fill
from .update import (COEF_SIZE, N_UPDATE_VARIANTS, penalized_update_1d, penalized_update_2d,
                     scratch_size, update_variant)

NAME = "numba"
compile_notice.install(_numba_event, "Numba")


# ---------------------------------------------------------------- the entry points
def _entry_points(stamp):
    """The cached entry points; `stamp` (in every closure) ties their disk cache to the
    backend's sources (kernels/numba/jit.py)."""
    @njit(**ENTRY_FLAGS)
    def train_epoch(X, Y, perm, batch_size, spec, par, T, ws, bn, wn, xdrops, nwords, columns,
                    li, lf, hpW, hpb, hpgb, parts, partf, opt, k0, k1, step0, t0, lrs,
                    loss_sums, grad, segments, clip_mode, clip_value, zout, apart):
        _ = stamp
        return epoch.train_epoch(X, Y, perm, batch_size, spec, par, T, ws, bn, wn, xdrops,
                                 nwords, columns, li, lf, hpW, hpb, hpgb, parts, partf, opt, k0,
                                 k1, step0, t0, lrs, loss_sums, grad, segments, clip_mode,
                                 clip_value, zout, apart)

    @njit(**ENTRY_FLAGS)
    def forward_inference(uses, par, X, Ws, bs, li, lf, bufs, out, batch_size, first):
        _ = stamp
        epoch.forward_inference(uses, par, X, Ws, bs, li, lf, bufs, out, batch_size, first)

    @njit(**ENTRY_FLAGS)
    def dense_forward(uses, par, x, W, b, out, act, slope, thr, scale, k0, k1, step, layer,
                      words, noise, nstd, pre, nwords, g0):
        _ = stamp
        _dense_forward(uses, par, x, W, b, out, act, slope, thr, scale, k0, k1, step, layer,
                       words, noise, nstd, pre, nwords, g0)

    @njit(**ENTRY_FLAGS)
    def dense_backward(uses, par, grad, out, x, W, dW, db, dx, act, slope, thr, scale, k0, k1,
                       step, layer, words, noise, nstd, pre, nwords, activity, g0):
        _ = stamp
        return _dense_backward(uses, par, grad, out, x, W, dW, db, dx, act, slope, thr, scale,
                               k0, k1, step, layer, words, noise, nstd, pre, nwords, activity,
                               g0)

    @njit(**ENTRY_FLAGS)
    def bn_dense_forward(uses, par, x, W, b, out, xhat, gb, save, act, slope, thr, scale, eps,
                         k0, k1, step, layer, words, noise, nstd, pre, nwords):
        _ = stamp
        _bn_dense_forward(uses, par, x, W, b, out, xhat, gb, save, act, slope, thr, scale, eps,
                          k0, k1, step, layer, words, noise, nstd, pre, nwords)

    @njit(**ENTRY_FLAGS)
    def bn_dense_backward(uses, par, grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx,
                          act, slope, thr, scale, momentum, k0, k1, step, layer, words, noise,
                          nstd, pre, nwords, activity):
        _ = stamp
        return _bn_dense_backward(uses, par, grad, out, xhat, x, W, gb, stats, save, dW, db,
                                  dgb, dx, act, slope, thr, scale, momentum, k0, k1, step,
                                  layer, words, noise, nstd, pre, nwords, activity)

    @njit(**ENTRY_FLAGS)
    def input_dropout(par, x, out, thr, scale, k0, k1, step, layer, words, noise, nstd,
                      nwords, g0):
        _ = stamp
        _input_dropout(par, x, out, thr, scale, k0, k1, step, layer, words, noise, nstd,
                       nwords, g0)

    @njit(**ENTRY_FLAGS)
    def weight_noise(par, W, out, std, k0, k1, step, layer, words):
        _ = stamp
        _weight_noise(par, W, out, std, k0, k1, step, layer, words)

    @njit(**ENTRY_FLAGS)
    def loss(uses, z, y, grad, code, param, want_grad):
        _ = stamp
        return _loss_of(uses, code, z, y, grad, param, want_grad)

    @njit(**ENTRY_FLAGS)
    def update_matrix(uses, par, w, g, m, v, hp, opt, t, coef, scratch, columns):
        _ = stamp
        return penalized_update_2d(uses, par, w, g, m, v, hp, opt, t, coef, scratch, columns)

    @njit(**ENTRY_FLAGS)
    def update_vector(uses, par, w, g, m, v, hp, opt, t, coef, scratch):
        _ = stamp
        return penalized_update_1d(uses, par, w, g, m, v, hp, opt, t, coef, scratch)

    @njit(**ENTRY_FLAGS)
    def philox_fill(par, words, n_elements, k0, k1, step, layer, stream):
        _ = stamp
        _philox_fill(par, words, n_elements, k0, k1, step, layer, stream, 0)

    return dict(train_epoch=train_epoch, forward_inference=forward_inference,
                dense_forward=dense_forward, dense_backward=dense_backward,
                bn_dense_forward=bn_dense_forward, bn_dense_backward=bn_dense_backward,
                input_dropout=input_dropout, weight_noise=weight_noise, loss=loss,
                update_matrix=update_matrix, update_vector=update_vector,
                philox_fill=philox_fill)


_K = _entry_points(SOURCE_STAMP)


def disk_cache_is_empty():
    """Whether no epoch of this backend was ever compiled into Numba's disk cache here (a
    fresh install): bench/prewarm.py then compiles the bench's networks on every core. Reads
    Numba's cache layout (the entry point's index file); False when that cannot be read."""
    try:
        return not os.path.exists(_K["train_epoch"]._cache._cache_file._index_path)
    except AttributeError:
        return False


# ---------------------------------------------------------------- the contract (per op)
def _words_for(n_elements):
    return np.empty((4, (n_elements + 3) // 4), np.uint32)


def _scalar(x, like):
    return like.dtype.type(x)


# The per-op entry points (tests, tools, MC dropout's passes) compile every activation and
# update variant and the parallel passes once per dtype: one compile serves every call. The
# compiled epoch is the one that specializes on what its network uses (_compiled_args).
_ALL_ACTS = uses_of(range(contract.N_ACTIVATIONS), contract.N_ACTIVATIONS)
_ALL_UPDATES = uses_of(range(N_UPDATE_VARIANTS), N_UPDATE_VARIANTS)
_PAR = 1


def _parallel(*sizes):
    """1 when a pass this big may run in parallel, else None (the parallel code is then
    never compiled): jit.py."""
    return 1 if max(sizes) >= contract.PARALLEL_MIN_ELEMENTS else None


def _noise_args(noise, noise_std, pre, out):
    """(code, std in out's dtype, pre or an empty (0, O) view, the noise words or None)."""
    noise = int(noise)
    pre = out[:0] if pre is None or pre.size == 0 else pre
    return noise, _scalar(noise_std, out), pre, _words_for(out.size) if noise else None


def group_of_row(row0, width):
    """The Philox group of element 0 of a (rows, width) block whose row 0 is row row0 of
    its batch: row0 * width / 4, which must be whole (an MPI shard starts at a multiple of 4
    rows: kernels/reference/sharded.py)."""
    if row0 < 0 or (int(row0) * int(width)) % 4:
        raise ValueError("row0 * width must be a non-negative multiple of 4 (whole Philox "
                         "groups)")
    return np.int64(int(row0) * int(width) // 4)


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=contract.NOISE_NONE, noise_std=0.0, pre=None, row0=0):
    k0, k1 = split_seed(seed)
    _K["dense_forward"](_ALL_ACTS, _PAR, x, W, b, out, int(act), _scalar(slope, out),
                        int(drop_threshold), _scalar(drop_scale, out), k0, k1, int(step),
                        int(layer), _words_for(out.size),
                        *_noise_args(noise, noise_std, pre, out),
                        group_of_row(row0, out.shape[1]))


def _activity_arg(out, l1, l2):
    """The compiled backward's `activity` argument (epilogue.activity_grads): None without
    a penalty, else (l1 / B, 2 l2 / B in the dtype, l1 != 0, l2 != 0, a partials
    scratch)."""
    if not (l1 or l2):
        return None
    dt = out.dtype.type
    l1, l2 = float(dt(l1)), float(dt(l2))
    n = max(1, out.shape[0])
    chunks = max(1, -(-out.size // ELEM_CHUNK))
    return (dt(l1 / n), dt(2.0 * l2 / n), l1 != 0.0, l2 != 0.0, np.zeros((chunks, 2)))


def _activity_penalty(sums, out, l1, l2):
    """(l1 sum |a| + l2 sum a^2) / B from the backward's sums (epoch._layer_backward's)."""
    if not (l1 or l2):
        return 0.0
    dt = out.dtype.type
    pen = (float(dt(l1)) * sums[0] if l1 else 0.0) + (float(dt(l2)) * sums[1] if l2 else 0.0)
    return pen / max(1, out.shape[0])


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None,
                   activity_l1=0.0, activity_l2=0.0, row0=0):
    k0, k1 = split_seed(seed)
    if dx.size == 0:
        dx = grad[:0]
    sums = _K["dense_backward"](_ALL_ACTS, _PAR, grad, out, x, W, dW, db, dx, int(act),
                                _scalar(slope, out), int(drop_threshold),
                                _scalar(drop_scale, out), k0, k1, int(step), int(layer),
                                _words_for(out.size), *_noise_args(noise, noise_std, pre, out),
                                _activity_arg(out, activity_l1, activity_l2),
                                group_of_row(row0, out.shape[1]))
    return _activity_penalty(sums, out, activity_l1, activity_l2)


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    _K["bn_dense_forward"](_ALL_ACTS, _PAR, x, W, b, out, xhat, gb, save, int(act),
                           _scalar(slope, out), int(drop_threshold), _scalar(drop_scale, out),
                           np.float64(_scalar(eps, out)), k0, k1, int(step), int(layer),
                           _words_for(out.size), *_noise_args(noise, noise_std, pre, out))


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=contract.NOISE_NONE, noise_std=0.0, pre=None, activity_l1=0.0,
                      activity_l2=0.0):
    k0, k1 = split_seed(seed)
    if dx.size == 0:
        dx = grad[:0]
    sums = _K["bn_dense_backward"](_ALL_ACTS, _PAR, grad, out, xhat, x, W, gb, stats, save, dW,
                                   db, dgb, dx, int(act), _scalar(slope, out),
                                   int(drop_threshold), _scalar(drop_scale, out),
                                   np.float64(_scalar(momentum, out)), k0, k1, int(step),
                                   int(layer), _words_for(out.size),
                                   *_noise_args(noise, noise_std, pre, out),
                                   _activity_arg(out, activity_l1, activity_l2))
    return _activity_penalty(sums, out, activity_l1, activity_l2)


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=contract.NOISE_NONE,
                  noise_std=0.0, row0=0):
    k0, k1 = split_seed(seed)
    noise = int(noise)
    _K["input_dropout"](_PAR, x, out, int(threshold), _scalar(scale, x), k0, k1, int(step),
                        int(layer), _words_for(x.size), noise, _scalar(noise_std, x),
                        _words_for(x.size) if noise else None, group_of_row(row0, x.shape[1]))


def weight_noise(W, out, std, seed, step, layer):
    k0, k1 = split_seed(seed)
    _K["weight_noise"](_PAR, W, out, _scalar(std, W), k0, k1, int(step), int(layer),
                       _words_for(W.size))


def loss_forward_backward(logits, y, grad, loss, param=None):
    return _K["loss"](loss_uses({int(loss)}), logits, y.astype(logits.dtype, copy=False), grad,
                      int(loss), loss_param(loss, param), True)


def loss_value(logits, y, loss, param=None):
    return _K["loss"](loss_uses({int(loss)}), logits, y.astype(logits.dtype, copy=False),
                      logits[:0], int(loss), loss_param(loss, param), False)


def penalized_update(w, g, m, v, hp, opt, t):
    hp = np.asarray(hp, np.float64)
    uses = _ALL_UPDATES
    coef = np.zeros(COEF_SIZE + w.shape[-1], w.dtype)
    scratch = np.zeros(scratch_size(w.size, w.shape[-1]))
    par = _PAR
    if w.ndim == 1:
        return _K["update_vector"](uses, par, w, g, m, v, hp, int(opt), int(t), coef, scratch)
    if m.size == 0:
        m = v = np.zeros((0, w.shape[1]), w.dtype)
    columns = 1
    return _K["update_matrix"](uses, par, w, g, m, v, hp, int(opt), int(t), coef, scratch,
                               columns)


def penalty_value(w, hp):
    from ..reference import penalty_value as reference
    return reference(w, hp)


def output_transform(logits, loss):
    from ..reference import output_transform as reference
    return reference(logits, loss)


def philox_words(n, seed, step, layer, stream):
    """The first n words of the (seed, step, layer, stream) sequence, element-indexed."""
    words = _words_for(max(1, int(n)))
    k0, k1 = split_seed(seed)
    _K["philox_fill"](_PAR, words, int(n), k0, k1, int(step), int(layer),
                      int(stream))
    return words.T.reshape(-1)[:int(n)].copy()


# ---------------------------------------------------------------- epoch / inference entry
def _update_uses(plan):
    """The update variants of a plan's tensors (jit.specialized)."""
    variants = set()
    for l in range(plan.n_layers):
        tensors = [(plan.hpW[l], plan.mW[l])]
        if plan.bs[l].size:
            tensors.append((plan.hpb[l], plan.mb[l]))
        if plan.bn_on(l):
            tensors.append((plan.hpgb[l], plan.mgb[l]))
        for hp, m in tensors:
            variants.add(update_variant(plan.opt, m.size > 0, hp[contract.HP_NESTEROV] != 0,
                                        hp[contract.HP_L1], hp[contract.HP_PROXIMAL] != 0))
    return uses_of(variants, N_UPDATE_VARIANTS)


def _compiled_args(plan):
    """The typed lists, scratch and compile-time choices of a plan's epoch, built once per
    workspace (plan.allocate clears plan.cache)."""
    args = plan.cache.get("numba")
    if args is not None:
        return args
    dt = plan.dtype
    L = plan.n_layers
    cols = max(W.shape[1] for W in plan.Ws)
    widest = max(cols, plan.Ws[0].shape[0])
    moments = [[a if a.size else np.zeros((0, W.shape[1]), dt) for a, W in zip(ms, plan.Ws)]
               for ms in (plan.mW, plan.vW)]
    T = epoch.Tensors(List(plan.Ws), List(plan.bs), List(plan.dWs), List(plan.dbs),
                      List(moments[0]), List(moments[1]), List(plan.mb), List(plan.vb))
    n_words = (plan.batch * widest + 3) // 4
    ws = epoch.Workspace(List(plan.acts), List(plan.grads), List(plan.pres), plan.xbuf,
                         List([y if y.size else np.zeros((0, 1), dt) for y in plan.ybufs]),
                         plan.scratch, np.zeros((4, n_words), np.uint32),
                         np.zeros(COEF_SIZE + cols, dt),
                         np.zeros(scratch_size(max([W.size for W in plan.Ws]
                                               + [g.size for g in plan.gbs]), cols)))
    bn = None
    if any(plan.bn_on(l) for l in range(L)):
        bn = epoch.BatchNormState(*(List(getattr(plan, name)) for name in
                                    ("gbs", "dgbs", "mgb", "vgb", "stats", "xhats", "saves")))
    xdrops = (List(plan.xdrops) if any(plan.has_input_transform(p)
                                       for p in range(plan.n_parts)) else None)
    noisy = any(plan.noise_of(l)[0] for l in range(L)) or any(
        plan.input_transform_of(p)[2] for p in range(plan.n_parts))
    nwords = np.zeros((4, n_words), np.uint32) if noisy else None
    columns = 1 if ((plan.hpW[:, contract.HP_GROUP] > 0).any()
                    or (plan.hpW[:, contract.HP_MAXNORM] > 0).any()) else None
    losses = [(int(plan.parts[p, contract.PT_LOSS]), plan.parts[p, contract.PT_W] >= 0)
              for p in range(plan.n_parts) if plan.parts[p, contract.PT_LOSS] >= 0]
    spec = epoch.Spec(uses_of(activations_used(plan.li), contract.N_ACTIVATIONS),
                      _update_uses(plan), loss_uses({code for code, _ in losses}),
                      loss_uses({code for code, weighted in losses if weighted}))
    par = _parallel(*([plan.batch * W.shape[1] for W in plan.Ws]
                      + [plan.batch * plan.part_input_width(p) for p in range(plan.n_parts)]
                      + [r.size for r in plan.store.records]))
    wn = None
    if plan.has_weight_noise():     # one W-sized scratch per noisy layer (plan.wnoises)
        wn = epoch.WeightNoiseState(List(plan.wnoises), _words_for(max(
            W.size for W in plan.wnoises)))
    # the activity pass's partial sums (epilogue.activity_grads): None without any activity
    # penalty, so that none of it is compiled
    apart = (np.zeros((max(1, -(-plan.batch * cols // ELEM_CHUNK)), 2))
             if plan.has_activity() else None)
    args = (spec, par, T, ws, bn, wn, xdrops, nwords, columns, apart)
    plan.cache["numba"] = args
    return args


def epoch_context(plan):
    """The thread policy of a Numba epoch (kernels/threads.py)."""
    return threads.numba_epoch(plan)


def train_epoch(plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None):
    """The batches of `perm` (an epoch or a chunk of whole batches) in one compiled call;
    returns (loss sums per part, penalty sum, steps, finite) as kernels/reference/epoch.py;
    lrs: one learning rate per step (Plan.step_rates); zout: the running logits
    (Plan.logits_out)."""
    lrs = plan.step_rates(perm.shape[0], batch_size, lrs)
    zout = plan.logits_out(perm.shape[0], zout)
    spec, par, T, ws, bn, wn, xdrops, nwords, columns, apart = _compiled_args(plan)
    k0, k1 = split_seed(plan.seed)
    loss_sums = np.zeros(plan.n_parts)
    pen, steps, finite = _K["train_epoch"](
        X, Y, perm, int(batch_size), spec, par, T, ws, bn, wn, xdrops, nwords, columns, plan.li,
        plan.lf, plan.hpW, plan.hpb, plan.hpgb, plan.parts, plan.partf, int(plan.opt), k0, k1,
        int(step0), int(t0), lrs, loss_sums, plan.grad,
        plan.grad_segments() if plan.clip_mode != contract.CLIP_NONE else None,
        int(plan.clip_mode), float(plan.clip_value), zout, apart)
    return loss_sums, pen, steps, finite


def forward_inference(plan, X, batch_size, part=0):
    """Logits of part `part` of an inference plan for X (that part's input)."""
    layers = plan.part_layers(part)
    n = X.shape[0]
    rows = max(1, min(batch_size, n))
    out = np.empty((n, plan.Ws[layers[-1]].shape[1]), plan.dtype)
    if n:
        uses = uses_of({int(plan.li[l, contract.LI_ACT]) for l in layers}, contract.N_ACTIVATIONS)
        par = _parallel(*(rows * plan.Ws[l].shape[1] for l in layers))
        _K["forward_inference"](uses, par, X, List([plan.Ws[l] for l in layers]),
                                List([plan.bs[l] for l in layers]), plan.li, plan.lf,
                                List([np.empty((rows, plan.Ws[l].shape[1]), plan.dtype)
                                      for l in layers]), out, int(rows), layers[0])
    return out
