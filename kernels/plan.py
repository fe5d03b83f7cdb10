"""Parameters as records, and the plan every backend reads.

`ParamStore` is a network's persistent numeric state: every trainable tensor in ONE flat
buffer, in the order (per dense layer) W (I, O), b (O,) when the layer has a bias, then a
BatchNorm's gb (2, O) (gamma; beta); the optimizer moments m and v in flat buffers of the
same layout (empty when the optimizer keeps none); the BatchNorm running statistics (2, O)
per BatchNorm layer in a flat buffer of their own (they are state, not trained). A per-tensor
table (`records`) says where each tensor lives. Model state, snapshots, saving, pruning and
every backend read these buffers: a snapshot is four array copies, the CUDA backend uploads
each buffer once.

`Plan` is the compute-side view of one network for one purpose (training or inference): the
store's tensors as per-layer views, their gradients (a flat buffer of the store's layout),
the per-layer configuration rows (contract LI_* / LF_*), the per-tensor hyperparameter rows
(HP_*), the parts of the network (PT_* / PF_*: a trunk and heads), and the workspace for one
batch. It is built complete here, in one place; backends keep their own derived state in
`plan.cache`.

Shape legend: B batch rows, I fan_in, O fan_out, L dense layers, P parts.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from . import contract

KINDS = ("W", "b", "gb")     # the trainable tensors of a dense layer, in buffer order


@dataclass(frozen=True)
class TensorRecord:
    """Where one trainable tensor lives in the store's flat buffers."""
    layer: int
    kind: str           # "W", "b" or "gb"
    shape: tuple
    offset: int

    @property
    def size(self):
        return int(math.prod(self.shape))     # math.prod: np.prod costs ~8 us a call

    @property
    def end(self):
        return self.offset + self.size


@dataclass(frozen=True)
class LayerShape:
    """What the store needs to know of a dense layer."""
    fan_in: int
    units: int
    bias: bool = True
    batchnorm: bool = False


class ParamStore:
    """The flat buffers of one network's parameters, moments and running statistics."""

    def __init__(self, layers, dtype, params=None, stats=None):
        self.dtype = np.dtype(dtype)
        self.layers = tuple(layers)
        records, off = [], 0
        for l, s in enumerate(self.layers):
            for kind, shape, present in (("W", (s.fan_in, s.units), True),
                                         ("b", (s.units,), s.bias),
                                         ("gb", (2, s.units), s.batchnorm)):
                if present:
                    records.append(TensorRecord(l, kind, shape, off))
                    off += int(math.prod(shape))
        self.records = tuple(records)
        self.size = off
        self._index = {(r.layer, r.kind): r for r in records}
        self.stat_offsets, soff = [], 0
        for s in self.layers:
            self.stat_offsets.append(soff if s.batchnorm else -1)
            soff += 2 * s.units if s.batchnorm else 0
        self.params = np.zeros(self.size, self.dtype) if params is None else params
        self.stats = np.zeros(soff, self.dtype) if stats is None else stats
        self.m = np.zeros(0, self.dtype)
        self.v = np.zeros(0, self.dtype)
        if params is None:      # BatchNorm starts as the identity: gamma 1, running var 1
            for l, s in enumerate(self.layers):
                if s.batchnorm:
                    self.tensor("gb", l)[contract.BN_GAMMA] = 1
                    self.running_stats(l)[contract.BN_VAR] = 1

    # ------------------------------------------------------------ views
    def record(self, kind, layer):
        return self._index.get((layer, kind))

    def _view(self, flat, kind, layer, empty_shape):
        r = self.record(kind, layer)
        if r is None or flat.size == 0:
            return np.zeros(empty_shape, self.dtype)
        return flat[r.offset:r.end].reshape(r.shape)

    def tensor(self, kind, layer, flat=None):
        """The view of tensor `kind` of dense layer `layer` in `flat` (the parameters by
        default; a gradient or moment buffer of the same layout otherwise). An absent
        tensor (no bias, no BatchNorm) is an empty array: (0,) for b, (0, 0) for gb."""
        empty = (0,) if kind == "b" else (0, 0)
        if kind == "W" and flat is not None and flat.size == 0:
            empty = (0, self.layers[layer].units)
        return self._view(self.params if flat is None else flat, kind, layer, empty)

    def running_stats(self, layer):
        """(2, O) running mean; variance of a BatchNorm layer, else an empty (0, 0)."""
        off = self.stat_offsets[layer]
        if off < 0:
            return np.zeros((0, 0), self.dtype)
        units = self.layers[layer].units
        return self.stats[off:off + 2 * units].reshape(2, units)

    def per_layer(self, kind, flat=None):
        return [self.tensor(kind, l, flat) for l in range(len(self.layers))]

    # ------------------------------------------------------------ moments
    def reset_moments(self, moments):
        """Fresh zero moments for an optimizer keeping `moments` (a subset of ("m", "v"))."""
        self.m = np.zeros(self.size if "m" in moments else 0, self.dtype)
        self.v = np.zeros(self.size if "v" in moments else 0, self.dtype)

    @property
    def has_moments(self):
        return self.m.size > 0 or self.v.size > 0

    # ------------------------------------------------------------ copies
    def copy(self):
        other = ParamStore(self.layers, self.dtype, self.params.copy(), self.stats.copy())
        other.m, other.v = self.m.copy(), self.v.copy()
        return other

    def assign(self, other):
        """Take `other`'s numbers into these buffers (same layout), in place: plans that
        point into this store keep seeing it."""
        if other.layers != self.layers:
            raise ValueError("assign: the stores have different layouts")
        self.params[...] = other.params
        self.stats[...] = other.stats
        for name in ("m", "v"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.shape == theirs.shape:
                mine[...] = theirs
            else:
                setattr(self, name, theirs.copy())

    def finite(self):
        """Whether every parameter, moment and running statistic is finite."""
        return all(bool(np.isfinite(a).all()) for a in (self.params, self.stats, self.m,
                                                        self.v))


@dataclass
class Plan:
    """The compute-side view of a network (see the module docstring). Built by `make_plan`;
    `allocate` adds the workspace of a training step."""
    store: ParamStore
    Ws: list
    bs: list
    gbs: list
    stats: list
    li: np.ndarray          # (L, LI_SIZE) int64
    lf: np.ndarray          # (L, LF_SIZE) in the parameter dtype
    hpW: np.ndarray         # (L, HP_SIZE) float64
    hpb: np.ndarray
    hpgb: np.ndarray
    parts: np.ndarray       # (P, PT_SIZE) int64
    partf: np.ndarray       # (P, PF_SIZE) float64
    opt: int
    seed: int
    training: bool
    grad: np.ndarray = None     # flat gradients, the store's layout (training plans)
    clip_mode: int = 0          # contract CLIP_*: the optimizer's gradient clipping
    clip_value: float = 0.0
    dWs: list = field(default_factory=list)
    dbs: list = field(default_factory=list)
    dgbs: list = field(default_factory=list)
    mW: list = field(default_factory=list)
    vW: list = field(default_factory=list)
    mb: list = field(default_factory=list)
    vb: list = field(default_factory=list)
    mgb: list = field(default_factory=list)
    vgb: list = field(default_factory=list)
    # workspace for one batch of at most `batch` rows (allocate)
    batch: int = 0
    acts: list = field(default_factory=list)    # (batch, O_l): what backward keeps
    grads: list = field(default_factory=list)   # (batch, O_l): upstream gradients
    pres: list = field(default_factory=list)    # (batch, O_l) kept for f' (keeps_pre) or (0, O_l)
    xhats: list = field(default_factory=list)   # (batch, O_l) BatchNorm's zhat, or (0, 0)
    saves: list = field(default_factory=list)   # (BN_SAVE_ROWS, O_l) float64, or (0, 0)
    xbuf: np.ndarray = None                     # (batch, I0) gathered inputs
    xdrops: list = field(default_factory=list)  # per part: its input transformed, or (0, w)
    ybufs: list = field(default_factory=list)   # per part: its gathered targets, or (0, 0)
    scratch: np.ndarray = None                  # (batch, trunk width): a head's input grad
    # per layer: the step's perturbed kernel Wn = W + sigma * n (weight noise on), (I_l, O_l),
    # else an empty (0, O_l): drawn once per step before the forward and read again by the
    # backward's dx (contract LF_WEIGHT_NOISE_STD), so a step draws I * O normals once
    wnoises: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)   # backend-private (typed lists, device state)

    # ------------------------------------------------------------ facts of the network
    @property
    def n_layers(self):
        return len(self.Ws)

    @property
    def n_parts(self):
        return int(self.parts.shape[0])

    @property
    def dtype(self):
        return self.store.dtype

    @property
    def n_outputs(self):
        """Widths of the parts' outputs, in part order."""
        return [self.Ws[int(p[contract.PT_END]) - 1].shape[1] for p in self.parts]

    @property
    def heads(self):
        """The parts whose outputs are the model's: the only part (with a loss or not, as an
        uncompiled Sequential's), else the parts with a loss (a MultiTask's heads)."""
        if self.n_parts == 1:
            return [0]
        return [p for p in range(self.n_parts) if int(self.parts[p, contract.PT_LOSS]) >= 0]

    def part_layers(self, p):
        return range(int(self.parts[p, contract.PT_FIRST]), int(self.parts[p, contract.PT_END]))

    def part_input_width(self, p):
        return self.Ws[int(self.parts[p, contract.PT_FIRST])].shape[0]

    def bn_on(self, l):
        return bool(self.li[l, contract.LI_BN])

    def noise_of(self, l):
        """(NOISE_* code, std) of the noise on layer l's output."""
        return int(self.li[l, contract.LI_NOISE]), self.lf[l, contract.LF_NOISE_STD]

    def input_transform_of(self, p):
        """(threshold, scale, noise code, noise std) of part p's input transform."""
        l = int(self.parts[p, contract.PT_FIRST])
        return (int(self.li[l, contract.LI_IN_DROP_THR]), self.lf[l, contract.LF_IN_DROP_SCALE],
                int(self.li[l, contract.LI_IN_NOISE]), self.lf[l, contract.LF_IN_NOISE_STD])

    def has_input_transform(self, p):
        thr, _, noise, _ = self.input_transform_of(p)
        return thr > 0 or noise != contract.NOISE_NONE

    def activity_of(self, l):
        """(l1, l2) of layer l's activity penalty (contract LF_ACTIVITY_*), as floats of the
        dtype's values; (0.0, 0.0): none."""
        return (float(self.lf[l, contract.LF_ACTIVITY_L1]),
                float(self.lf[l, contract.LF_ACTIVITY_L2]))

    def activity_on(self, l):
        return any(v != 0.0 for v in self.activity_of(l))

    def has_activity(self):
        """Whether any layer has an activity penalty (training plans)."""
        return self.training and any(self.activity_on(l) for l in range(self.n_layers))

    def keeps_pre(self, l):
        return contract.keeps_pre(self.li[l, contract.LI_ACT], self.li[l, contract.LI_NOISE],
                                  int(self.li[l, contract.LI_DROP_THR]) > 0,
                                  self.training and self.activity_on(l))

    def weight_noise_of(self, l):
        """sigma of the noise on layer l's kernel W (0: off; contract LF_WEIGHT_NOISE_STD)."""
        return self.lf[l, contract.LF_WEIGHT_NOISE_STD]

    def has_weight_noise(self):
        """Whether any layer trains on a perturbed kernel (training plans only)."""
        return self.training and any(contract.weight_noise_on(self.lf, l)
                                     for l in range(self.n_layers))

    def weight_noise_bytes(self):
        """The bytes of the weight-noise scratch (one W-sized buffer per noisy layer)."""
        return self.dtype.itemsize * sum(W.size for l, W in enumerate(self.Ws)
                                         if contract.weight_noise_on(self.lf, l))

    def has_dropout(self):
        """Whether any dropout or noise is active in training (what MC sampling draws)."""
        return bool((self.li[:, contract.LI_DROP_THR] > 0).any()
                    or any(self.noise_of(l)[0] for l in range(self.n_layers))
                    or any(self.has_input_transform(p) for p in range(self.n_parts)))

    def kept_bytes_per_element(self):
        """What one training step keeps between forward and backward, per activation
        element: the layer output, a BatchNorm layer's zhat, and a pre buffer where f'
        needs one, or an activity penalty needs a = f(z) under dropout or noise
        (keeps_pre)."""
        units = sum(W.shape[1] for W in self.Ws)
        bn = sum(W.shape[1] for l, W in enumerate(self.Ws) if self.bn_on(l))
        pre = sum(W.shape[1] for l, W in enumerate(self.Ws) if self.keeps_pre(l))
        return self.dtype.itemsize * (units + bn + pre) / units

    def grad_segments(self):
        """(n_tensors, 2) int64 [offset, end) of every tensor in the flat gradient buffer
        (what CLIP_NORM clips one by one)."""
        return np.array([(r.offset, r.end) for r in self.store.records],
                        np.int64).reshape(-1, 2)

    # ------------------------------------------------------------ learning rates
    def step_rates(self, n_rows, batch_size, lrs=None):
        """The learning rate of each training step of a call over n_rows rows in batches of
        batch_size (one per batch), float64: `lrs` as given (checked: one finite rate > 0
        per step, >= 0: a schedule may end at 0), or the optimizer's rate in the hp rows for
        every step. The compiled epochs write step k's rate into the HP_LR slot of every hp
        row before its update (one optimizer: the slot is the same in every row)."""
        n_steps = self.n_steps(n_rows, batch_size)
        if lrs is None:
            return np.full(n_steps, self.hpW[0, contract.HP_LR] if self.n_layers else 0.0)
        lrs = np.ascontiguousarray(lrs, np.float64).reshape(-1)
        if lrs.shape[0] < n_steps:
            raise ValueError(f"train_epoch: {lrs.shape[0]} learning rates for {n_steps} steps")
        if not (np.isfinite(lrs[:n_steps]).all() and (lrs[:n_steps] >= 0).all()):
            raise ValueError("train_epoch: every step's learning rate must be finite and >= 0")
        return lrs

    @staticmethod
    def n_steps(n_rows, batch_size):
        return -(-int(n_rows) // max(1, int(batch_size)))

    def logits_out(self, n_rows, zout):
        """train_epoch's zout, checked: None (or an empty array) when no part keeps its
        logits, else (n_rows, width) in the dtype with every PT_Z0 part's columns."""
        keep = [p for p in range(self.n_parts) if int(self.parts[p, contract.PT_Z0]) >= 0]
        if zout is None or not keep:
            return np.zeros((0, 1), self.dtype)
        width = max(int(self.parts[p, contract.PT_Z0]) + self.n_outputs[p] for p in keep)
        if (not isinstance(zout, np.ndarray) or zout.dtype != self.dtype
                or zout.shape[0] < n_rows or zout.shape[1] < width
                or not zout.flags.c_contiguous):
            raise ValueError(f"train_epoch: zout must be C-contiguous {self.dtype} of at "
                             f"least ({n_rows}, {width})")
        return zout

    def set_learning_rate(self, lr):
        """Write lr into the HP_LR slot of every hp row (the host copy)."""
        for hp in (self.hpW, self.hpb, self.hpgb):
            hp[:, contract.HP_LR] = lr

    # ------------------------------------------------------------ workspace
    def allocate(self, batch, y_widths):
        """Preallocate every buffer one training step touches, for batches of <= `batch`
        rows; y_widths[p] is the target width of part p (0 for a part without a loss)."""
        dt, B = self.dtype, int(batch)
        self.batch = B
        self.acts = [np.zeros((B, W.shape[1]), dt) for W in self.Ws]
        self.grads = [np.zeros((B, W.shape[1]), dt) for W in self.Ws]
        self.pres = [np.zeros((B if self.keeps_pre(l) else 0, W.shape[1]), dt)
                     for l, W in enumerate(self.Ws)]
        self.xhats = [np.zeros((B, W.shape[1]) if self.bn_on(l) else (0, 0), dt)
                      for l, W in enumerate(self.Ws)]
        self.saves = [np.zeros((contract.BN_SAVE_ROWS, W.shape[1]) if self.bn_on(l) else (0, 0))
                      for l, W in enumerate(self.Ws)]
        self.xbuf = np.zeros((B, self.Ws[0].shape[0]), dt)
        self.xdrops = [np.zeros((B if self.has_input_transform(p) else 0,
                                 self.part_input_width(p)), dt) for p in range(self.n_parts)]
        self.ybufs = [np.zeros((B, int(w)) if int(self.parts[p, contract.PT_LOSS]) >= 0 else (0, 0),
                               dt) for p, w in enumerate(y_widths)]
        trunk_width = self.Ws[int(self.parts[0, contract.PT_END]) - 1].shape[1]
        self.scratch = np.zeros((B if self.n_parts > 2 else 0, trunk_width), dt)
        self.wnoises = [np.zeros(W.shape if contract.weight_noise_on(self.lf, l)
                                 else (0, W.shape[1]), dt) for l, W in enumerate(self.Ws)]
        self.cache.clear()
        return self


def make_plan(store, li, lf, hpW, hpb, hpgb, parts, partf, opt, seed, training=True,
              folded=None, clip=(0, 0.0)):
    """The plan of `store` with these configuration rows. training=True adds a gradient
    buffer and the moment views (the store's moments must match the optimizer already);
    training=False is an inference plan: `folded` optionally replaces (W, b) of layers
    whose BatchNorm is folded in ({layer: (W, b)}), and li[:, LI_BN] must be 0."""
    L = len(store.layers)
    Ws, bs = store.per_layer("W"), store.per_layer("b")
    for l, (W, b) in (folded or {}).items():
        Ws[l], bs[l] = W, b
    plan = Plan(store=store, Ws=Ws, bs=bs, gbs=store.per_layer("gb"),
                stats=[store.running_stats(l) for l in range(L)],
                li=np.asarray(li, np.int64), lf=np.asarray(lf, store.dtype),
                hpW=np.asarray(hpW, np.float64), hpb=np.asarray(hpb, np.float64),
                hpgb=np.asarray(hpgb, np.float64), parts=np.asarray(parts, np.int64),
                partf=np.asarray(partf, np.float64), opt=int(opt), seed=int(seed),
                training=bool(training), clip_mode=int(clip[0]), clip_value=float(clip[1]))
    if training:
        plan.grad = np.zeros(store.size, store.dtype)
        plan.dWs, plan.dbs, plan.dgbs = (store.per_layer(k, plan.grad) for k in KINDS)
        plan.mW, plan.mb, plan.mgb = (store.per_layer(k, store.m) for k in KINDS)
        plan.vW, plan.vb, plan.vgb = (store.per_layer(k, store.v) for k in KINDS)
    return plan


def single_part(n_layers, loss, y_width, loss_param=None):
    """The parts table of a Sequential: one chain that is trunk and head at once; its loss
    weight 1, its loss parameter `loss_param` (None: the loss's default)."""
    parts = np.zeros((1, contract.PT_SIZE), np.int64)
    parts[0] = (0, n_layers, -1, loss, 0, y_width, -1, -1)
    partf = np.zeros((1, contract.PF_SIZE))
    partf[0, contract.PF_WEIGHT] = 1.0
    partf[0, contract.PF_LOSS_PARAM] = (contract.LOSS_BY_CODE[int(loss)].default
                                        if loss_param is None else loss_param)
    return parts, partf
