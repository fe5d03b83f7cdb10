"""The one engine under Sequential and MultiTask: a network of parts (a tree of chains).

A network is a trunk and heads (kernels/plan.py "parts"): each part is a chain of fastreg
layers folded into dense blocks (a Dense with its dropout, BatchNorm and noise fused in);
the trunk reads the inputs, every head reads the trunk's output. A Sequential is one part
that is trunk and head at once; a MultiTask is a trunk (no loss) and named heads, each with
its loss and weight. The dense blocks are numbered globally, part by part, and that number
is a block's Philox layer word (DESIGN.md "Randomness"), so a one-head MultiTask draws
exactly what the Sequential of its trunk + head layers draws.

`Network` owns what both front ends share: the folding and placement rules of the layers,
the parameters (a kernels.plan.ParamStore: flat buffers with a per-tensor table), the
counters (training steps ever run: the Philox step; optimizer steps since compile: Adam's
bias correction; epochs run: the shuffles; MC passes drawn), the configuration rows and
plans every backend reads, snapshots, the weight list in Keras' order, and the penalty.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from . import interrupts
from .layers import (NOISE_LAYERS, SOFTMAX, ActivityRegularization, AlphaDropout, BatchNorm,
                     Dense, Dropout, GaussianNoise, Layer, noise_code)
from . import regularizers
from .kernels import contract
from .kernels.plan import LayerShape, ParamStore, make_plan
from .kernels.philox import dropout_scale, dropout_threshold
from .kernels.reference import penalty_value
from .validation import check_in_dtype, check_seed


# ---------------------------------------------------------------- dense blocks
@dataclass
class Block:
    """A Dense with what is fused into it: the dropout on its input (first block of a part
    only) and on its output, its BatchNorm, the noise on its input / output, and the
    activity penalty (l1, l2) on its output a (its activity_regularizer plus the
    ActivityRegularization layers folded onto it)."""
    dense: Dense
    in_drop: float = 0.0
    out_drop: float = 0.0
    bn: BatchNorm = None
    in_noise: Layer = None
    noise: Layer = None
    activity: tuple = (0.0, 0.0)


def _check_alpha_dropout(noise, rate, where):
    """AlphaDropout is the only dropout of the output it acts on (it uses that output's
    dropout mask and scale)."""
    if isinstance(noise, AlphaDropout) and rate:
        raise ValueError(f"{noise!r} on {where} has a Dropout (or a Dense dropout=) there "
                         f"too: AlphaDropout is that output's dropout; keep one of them")


def fold_blocks(layers, partial=False):
    """Fold a layer list into dense blocks (the placement rules; ValueError on a bad order).
    partial=True folds a list that may have no Dense yet (Sequential.add's check)."""
    blocks, pending = [], 0.0
    noise = None    # the noise layer since the last Dense (or on the inputs)

    def where():
        return "the inputs" if not blocks else f"the output of Dense {len(blocks) - 1}"
    for i, layer in enumerate(layers):
        if isinstance(layer, ActivityRegularization):
            _fold_activity(layer, blocks, pending, noise, where())
            continue
        if blocks and blocks[-1].dense.activation == SOFTMAX \
                and isinstance(layer, (Dense, Dropout) + NOISE_LAYERS):
            raise ValueError(f"{layer!r} after a softmax Dense: softmax is only accepted on "
                             f"the last Dense, as its output (the categorical losses' logits "
                             f"path)")
        if isinstance(layer, NOISE_LAYERS):
            if noise is not None:
                raise ValueError(f"at most one GaussianNoise / GaussianDropout / AlphaDropout "
                                 f"per dense output (or on the inputs): {noise!r} and "
                                 f"{layer!r} both act on {where()}")
            if pending and isinstance(layer, GaussianNoise):
                raise ValueError(f"{layer!r} after a Dropout on {where()}: the fused order is "
                                 f"activation, noise, dropout; put the Dropout after the "
                                 f"GaussianNoise")
            _check_alpha_dropout(layer, pending or (blocks and blocks[-1].out_drop), where())
            noise = layer
            continue
        if isinstance(layer, BatchNorm):
            if i == 0 or not isinstance(layers[i - 1], Dense):
                raise ValueError("BatchNorm must come right after a Dense: it normalizes "
                                 "that Dense's pre-activation x @ W + b")
            blocks[-1].bn = layer
            continue
        if isinstance(layer, Dropout):
            _check_alpha_dropout(noise, layer.rate, where())
            pending = 1.0 - (1.0 - pending) * (1.0 - layer.rate)
            continue
        if isinstance(layer, Dense):
            if layer.activation == SOFTMAX and layer.dropout:
                raise ValueError(f"{layer!r}: a softmax Dense is the model's output, it takes "
                                 f"no dropout")
            if pending and blocks:
                prev = blocks[-1]
                prev.out_drop = 1.0 - (1.0 - prev.out_drop) * (1.0 - pending)
                pending = 0.0
            if noise is not None and blocks:
                blocks[-1].noise = noise
            blocks.append(Block(layer, in_drop=pending if not blocks else 0.0,
                                out_drop=layer.dropout,
                                in_noise=noise if not blocks else None,
                                activity=layer.activity))
            pending = 0.0
            noise = None
    if not blocks:
        if partial:
            return blocks
        raise ValueError("a Sequential model needs at least one Dense layer")
    if pending:
        last = blocks[-1]
        last.out_drop = 1.0 - (1.0 - last.out_drop) * (1.0 - pending)
    if noise is not None:
        blocks[-1].noise = noise
    return blocks


def _fold_activity(layer, blocks, pending, noise, where):
    """Fold an ActivityRegularization onto the block before it: it penalizes that Dense's
    output a (Keras' ActivityRegularization after a Dense), which the fused kernels compute
    before the output's noise and dropout. Where its input is anything else, ValueError
    naming the placement."""
    if not blocks:
        raise ValueError(f"{layer!r} before any Dense: it would penalize the input (of the "
                         f"model, or of a MultiTask head), which fastreg does not fold; put "
                         f"it after a Dense (for a head, after the trunk's last Dense), or "
                         f"pass activity_regularizer= to that Dense")
    blk = blocks[-1]
    if blk.dense.activation == SOFTMAX:
        raise ValueError(f"{layer!r} after a softmax Dense: its kernels compute the logits "
                         f"(the loss's softmax path), not the probabilities Keras would "
                         f"penalize; put it on a hidden Dense")
    if pending or (noise is not None and noise_code(noise)[0] != contract.NOISE_NONE):
        between = f"{noise!r}" if noise is not None else "a Dropout"
        raise ValueError(f"{layer!r} after {between} on {where}: Keras would penalize the "
                         f"dropped / noisy values, which the fused kernels do not keep; put "
                         f"it right after the Dense (or its BatchNorm), before the {between}")
    blk.activity = (blk.activity[0] + layer.l1, blk.activity[1] + layer.l2)


def check_loss_and_last_layer(loss, last, where=""):
    """The rules tying a loss to the last Dense; returns the loss as a fastreg.losses.Loss.
    The cross-entropies and poisson take the last layer's raw values (logits, log-rate), so
    that layer is linear; "softmax" is accepted there for the categorical ones (it IS their
    logits path: the loss takes the logits, predict returns the softmax) and refused
    elsewhere; the categorical ones need a unit per class."""
    from . import losses
    try:
        loss = losses.get(loss)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}{exc}") from None
    row = loss.row
    categorical = row.output == "softmax"
    if last.activation == SOFTMAX and not categorical:
        raise ValueError(f"{where}softmax on the last Dense needs a categorical cross-entropy "
                         f"loss (categorical_crossentropy or sparse_categorical_crossentropy), "
                         f"not {loss.name}; use a linear last Dense")
    if row.output != "identity" and last.activation not in (None, SOFTMAX):
        takes = "the log-rate" if row.output == "exp" else "logits"
        raise ValueError(f"{where}{loss.name} takes {takes}: make the last Dense linear "
                         f"(activation=None); predict() returns the "
                         f"{'rate' if row.output == 'exp' else 'probabilities'}")
    if categorical and last.units < 2:
        raise ValueError(f"{where}{loss.name} needs a last Dense with one unit per class "
                         f"(>= 2 units)")
    return loss


def check_part_layers(layers, where=""):
    """Sequential.add's rules for a whole layer list: fastreg layers, noise and BatchNorm
    placement (ValueError / TypeError prefixed with `where`)."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{where}fastreg layers (Dense, Dropout, BatchNorm, "
                            f"GaussianNoise, GaussianDropout, AlphaDropout, "
                            f"ActivityRegularization) only, got {layer!r}")
        if isinstance(layer, BatchNorm) and not (i and isinstance(layers[i - 1], Dense)):
            after = type(layers[i - 1]).__name__ if i else "nothing (first layer)"
            raise ValueError(f"{where}BatchNorm must come right after a Dense: it normalizes "
                             f"that Dense's pre-activation x @ W + b; here it follows {after}")
    try:
        fold_blocks(layers, partial=True)
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def check_in_model_dtype(layer, dtype):
    """What a layer's numbers become in the model's dtype, where the kernels use them: a
    BatchNorm's eps is added and its momentum mixes the running statistics in that dtype
    (an eps that rounds to 0 divides by a zero variance; a momentum that rounds to 1 never
    moves the statistics; one that rounds to 0 only keeps the last batch's, which is
    allowed)."""
    if isinstance(layer, Dense) and layer.weight_noise:
        check_in_dtype("Dense weight_noise", layer.weight_noise, dtype)
    if isinstance(layer, BatchNorm):
        check_in_dtype("BatchNorm eps", layer.eps, dtype)
        check_in_dtype("BatchNorm momentum", layer.momentum, dtype, positive=False,
                       below_one=True)
    if isinstance(layer, (Dense, ActivityRegularization)):
        # the kernels read an activity strength in the dtype (contract LF_ACTIVITY_*): one
        # that rounds to 0 would silently switch the penalty off
        for name, value in zip(("l1", "l2"), layer.activity):
            if value:
                check_in_dtype(f"{type(layer).__name__} activity {name}", value, dtype)


def init_kernel(kind, fan_in, fan_out, rng, dtype):
    if kind == "glorot_uniform":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        W = rng.uniform(-limit, limit, (fan_in, fan_out))
    elif kind == "glorot_normal":
        W = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out))
    elif kind == "he_uniform":
        limit = math.sqrt(6.0 / fan_in)
        W = rng.uniform(-limit, limit, (fan_in, fan_out))
    elif kind == "he_normal":
        W = rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out))
    elif kind == "lecun_normal":
        W = rng.normal(0.0, math.sqrt(1.0 / fan_in), (fan_in, fan_out))
    elif kind == "orthogonal":
        # Keras' Orthogonal(gain=1): the Q of a normal matrix's QR, signs fixed by diag(R),
        # so the columns (fan_in >= fan_out) or the rows are orthonormal
        a = rng.normal(0.0, 1.0, (max(fan_in, fan_out), min(fan_in, fan_out)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        W = q if fan_in >= fan_out else q.T
    elif kind == "zeros":
        W = np.zeros((fan_in, fan_out))
    else:  # ones
        W = np.ones((fan_in, fan_out))
    return np.ascontiguousarray(W, dtype=dtype)


# ---------------------------------------------------------------- parts and the network
@dataclass
class Part:
    """A chain of layers: the trunk (loss None under heads) or a head (label, loss, weight).
    `loss` is given as a name or a fastreg.losses object and kept as the loss's name, its
    parameter (huber's delta, label smoothing) in `loss_param` (contract PF_LOSS_PARAM)."""
    label: str
    layers: list
    loss: str = None
    weight: float = 1.0
    blocks: list = field(default_factory=list)
    loss_param: float = 0.0

    def __post_init__(self):
        if self.loss is not None:
            self.set_loss(self.loss)

    def set_loss(self, loss):
        from . import losses
        loss = losses.get(loss)
        self.loss, self.loss_param = loss.name, loss.param

    def loss_config(self):
        """The loss as a saved model records it (fastreg.losses.Loss.get_config)."""
        from . import losses
        return None if self.loss is None else losses.of(self.loss, self.loss_param).get_config()


@dataclass
class Counters:
    """The training counters saved with a model (DESIGN.md "Randomness")."""
    step: int = 0          # training steps ever run: the Philox step word
    t: int = 0             # optimizer steps since compile: Adam's bias correction
    epochs_run: int = 0    # epochs ever run: seeds the shuffles
    mc_step: int = 0       # MC-dropout passes drawn without a seed


class Network:
    """Parts, parameters and counters (module docstring). Parts are given trunk first."""

    def __init__(self, parts, seed=0, dtype="float32"):
        self.seed = check_seed("seed", seed)
        try:
            dt = np.dtype(dtype)
        except TypeError:       # not a dtype at all ("float" typo'd, a list...)
            dt = None
        if dt not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.dtype = dt
        self.parts = list(parts)
        for part in self.parts:
            for layer in part.layers:
                check_in_model_dtype(layer, self.dtype)
        self.input_dim = None
        # the columns of the original inputs this network reads, after prune(inputs=True)
        # removed dead ones (fastreg/pruning.py); None: all of them
        self.input_columns = None
        self.store = None           # a kernels.plan.ParamStore once built
        self.moments_ready = False  # the optimizer's moments exist (made at the first fit)
        self.counters = Counters()
        self.refold()

    def refold(self):
        """Fold every part's layers into blocks (a part may still be empty: a Sequential
        being built with add)."""
        for part in self.parts:
            part.blocks = fold_blocks(part.layers, partial=True)
        if len(self.parts) > 1 and self.parts[0].blocks \
                and self.parts[0].blocks[-1].dense.activation == SOFTMAX:
            raise ValueError("softmax is only accepted on the last Dense of a categorical "
                             "head (its logits path), not on the trunk")
        if self.n_blocks >= contract.MAX_LAYER_WORDS:
            raise ValueError(f"a network takes fewer than {contract.MAX_LAYER_WORDS} Dense layers")

    # ------------------------------------------------------------ structure
    @property
    def blocks(self):
        """Every dense block, in the global order (trunk first, then each head)."""
        return [b for part in self.parts for b in part.blocks]

    @property
    def n_blocks(self):
        return sum(len(part.blocks) for part in self.parts)

    def part_ranges(self):
        """(first, end) global block indices of every part."""
        out, first = [], 0
        for part in self.parts:
            out.append((first, first + len(part.blocks)))
            first += len(part.blocks)
        return out

    def n_outputs(self, p):
        return self.parts[p].blocks[-1].dense.units

    @property
    def heads(self):
        """The parts whose outputs are the model's: a Sequential's one part (compiled or
        not), or a MultiTask's heads (the parts with a loss)."""
        if len(self.parts) == 1:
            return [0]
        return [p for p, part in enumerate(self.parts) if part.loss is not None]

    def output_loss(self, p):
        """The loss code whose output transform predict applies to part p: its loss, or
        for a part not compiled yet the identity (mse's), the softmax when its last Dense
        says "softmax"."""
        part = self.parts[p]
        if part.loss is not None:
            return contract.LOSSES[part.loss]
        last = part.blocks[-1].dense if part.blocks else None
        return (contract.LOSS_SCE if last is not None and last.activation == SOFTMAX
                else contract.LOSS_MSE)

    @property
    def built(self):
        return self.store is not None

    def fan_ins(self, input_dim):
        out = []
        trunk_out = None
        for p, part in enumerate(self.parts):
            fan_in = input_dim if p == 0 else trunk_out
            for blk in part.blocks:
                out.append(fan_in)
                fan_in = blk.dense.units
            if p == 0:
                trunk_out = fan_in
        return out

    def layer_shapes(self, input_dim):
        return [LayerShape(fan_in, b.dense.units, b.dense.use_bias, b.bn is not None)
                for fan_in, b in zip(self.fan_ins(input_dim), self.blocks)]

    def build(self, input_dim):
        """Create the weights from the seed: one generator, blocks in the global order;
        biases 0 (or 1: bias_initializer="ones"); BatchNorm gamma 1, beta 0, running mean 0,
        variance 1."""
        store = ParamStore(self.layer_shapes(input_dim), self.dtype)
        rng = np.random.default_rng(self.seed)
        for l, blk in enumerate(self.blocks):
            W = store.tensor("W", l)
            W[...] = init_kernel(blk.dense.kernel_initializer, W.shape[0], W.shape[1], rng,
                                 self.dtype)
            if blk.dense.use_bias and blk.dense.bias_initializer == "ones":
                store.tensor("b", l)[...] = 1
        self.input_dim = int(input_dim)
        self.input_columns = None
        self.store = store
        self.moments_ready = False

    def inputs_hint(self):
        """What a wrong-width error adds for an input-pruned network ("" otherwise)."""
        if self.input_columns is None:
            return ""
        return (f" (prune(inputs=True) kept the columns {self.input_columns.tolist()} of "
                f"the original X: pass X[:, model.input_columns])")

    def inputs_line(self):
        """The summary line of an input-pruned network, or None."""
        if self.input_columns is None:
            return None
        cols = self.input_columns.tolist()
        return (f"inputs: {len(cols)} columns {cols} of the original X (prune(inputs=True) "
                f"removed the others): pass X[:, model.input_columns]")

    def count_params(self):
        """Parameters of all layers, BatchNorm's running statistics included (as Keras)."""
        return int(self.store.size + self.store.stats.size) if self.built else 0

    # ------------------------------------------------------------ optimizer state
    def reset_optimizer_state(self):
        self.moments_ready = False
        if self.built:
            self.store.reset_moments(())

    def ensure_optimizer_state(self, optimizer):
        if not self.moments_ready:
            self.store.reset_moments(optimizer.moments)
            self.moments_ready = True

    # ------------------------------------------------------------ snapshots
    def snapshot(self):
        """A copy of everything a fit changes (parameters, moments, statistics, counters)."""
        return {"store": None if self.store is None else self.store.copy(),
                "moments_ready": self.moments_ready,
                "counters": Counters(**vars(self.counters)), "input_dim": self.input_dim}

    def restore(self, snap):
        """Put a snapshot back: in place when the layout is unchanged (plans keep pointing
        into the same buffers), else the snapshot's own store. A Ctrl-C during it waits for
        its end (fastreg/interrupts.py): never a half-restored network."""
        with interrupts.deferred():
            store = snap["store"]
            if store is not None and self.store is not None \
                    and store.layers == self.store.layers:
                self.store.assign(store)
            else:
                self.store = None if store is None else store.copy()
            self.moments_ready = snap["moments_ready"]
            self.counters = Counters(**vars(snap["counters"]))
            self.input_dim = snap["input_dim"]

    # ------------------------------------------------------------ configuration rows
    def config_rows(self, optimizer, training):
        """li, lf, hpW, hpb, hpgb of every block (kernels/contract.py layouts)."""
        n = self.n_blocks
        li = np.zeros((n, contract.LI_SIZE), np.int64)
        lf = np.zeros((n, contract.LF_SIZE), self.dtype)
        hps = [np.zeros((n, contract.HP_SIZE)) for _ in range(3)]
        opt_slots = optimizer.slots()
        for i, blk in enumerate(self.blocks):
            d = blk.dense
            li[i, contract.LI_ACT], lf[i, contract.LF_SLOPE] = d.kernel_activation
            li[i, contract.LI_HAS_BIAS] = int(d.use_bias)
            li[i, contract.LI_DROP_THR], lf[i, contract.LF_DROP_SCALE] = self.dropout_slots(
                blk.out_drop, blk.noise)
            li[i, contract.LI_IN_DROP_THR], lf[i, contract.LF_IN_DROP_SCALE] = self.dropout_slots(
                blk.in_drop, blk.in_noise)
            li[i, contract.LI_NOISE], lf[i, contract.LF_NOISE_STD] = noise_code(blk.noise)
            li[i, contract.LI_IN_NOISE], lf[i, contract.LF_IN_NOISE_STD] = noise_code(blk.in_noise)
            if training:        # inference (predict, evaluate, MC dropout): the clean W
                lf[i, contract.LF_WEIGHT_NOISE_STD] = d.weight_noise
            lf[i, contract.LF_ACTIVITY_L1], lf[i, contract.LF_ACTIVITY_L2] = blk.activity
            if blk.bn is not None:
                li[i, contract.LI_BN] = int(training)   # inference: folded into W, b
                lf[i, contract.LF_BN_EPS] = blk.bn.eps
                lf[i, contract.LF_BN_MOMENTUM] = blk.bn.momentum
            # W: its regularizers and the optimizer's decoupled decay; b: its own
            # regularizers, never decayed; gamma/beta: never penalized nor decayed
            for row, regs, decayed in ((hps[0][i], d.regularizer, True),
                                       (hps[1][i], d.bias_regularizer, False),
                                       (hps[2][i], [], False)):
                for name, value in opt_slots.items():
                    row[contract.SLOTS[name].index] = value
                if not decayed:
                    row[contract.HP_DECOUPLED] = 0.0
                for name, value in regularizers.combine(regs).items():
                    row[contract.SLOTS[name].index] = value
        return (li, lf) + tuple(hps)

    def dropout_slots(self, rate, noise):
        """(threshold, scale) of a dropout slot: an inverted Dropout(rate)'s, or the
        AlphaDropout's that takes the slot (its mask threshold, its scale a; fold_blocks
        leaves no other dropout beside it)."""
        if isinstance(noise, AlphaDropout) and noise.rate:
            return dropout_threshold(noise.rate), self.dtype.type(noise.scale)
        return dropout_threshold(rate), dropout_scale(rate, self.dtype.type)

    def parts_rows(self, y_widths, weight_cols=None, z_cols=None):
        """The parts table (PT_* / PF_*) with each head's target columns; weight_cols[p]:
        the column of Y with part p's sample weights, z_cols[p] the first column of zout
        for its logits, -1 for none (None: none at all)."""
        P = len(self.parts)
        parts = np.zeros((P, contract.PT_SIZE), np.int64)
        partf = np.zeros((P, contract.PF_SIZE))
        weight_cols = [-1] * P if weight_cols is None else weight_cols
        z_cols = [-1] * P if z_cols is None else z_cols
        y0 = 0
        for p, ((first, end), part, w) in enumerate(zip(self.part_ranges(), self.parts,
                                                        y_widths)):
            loss = -1 if part.loss is None else contract.LOSSES[part.loss]
            parts[p] = (first, end, -1 if p == 0 else 0, loss, y0, y0 + w, weight_cols[p],
                        z_cols[p])
            partf[p, contract.PF_WEIGHT] = part.weight
            partf[p, contract.PF_LOSS_PARAM] = part.loss_param
            y0 += w
        return parts, partf

    # ------------------------------------------------------------ plans
    def training_plan(self, optimizer, batch, y_widths, weight_cols=None, z_cols=None):
        """The plan a fit trains (views of the store), its workspace for `batch` rows;
        y_widths[p]: the target width of part p (0 for the trunk under heads); weight_cols,
        z_cols: as parts_rows."""
        self.ensure_optimizer_state(optimizer)
        li, lf, hpW, hpb, hpgb = self.config_rows(optimizer, training=True)
        parts, partf = self.parts_rows(y_widths, weight_cols, z_cols)
        plan = make_plan(self.store, li, lf, hpW, hpb, hpgb, parts, partf, optimizer.code,
                         self.seed, training=True, clip=optimizer.clip)
        return plan.allocate(batch, y_widths)

    def inference_plan(self, optimizer=None):
        """The plan of inference: BatchNorm folded into W, b (running statistics)."""
        from .optimizers import Adam
        li, lf, hpW, hpb, hpgb = self.config_rows(optimizer or Adam(), training=False)
        parts, partf = self.parts_rows([0] * len(self.parts))
        folded = {l: self.folded(l) for l, blk in enumerate(self.blocks) if blk.bn is not None}
        return make_plan(self.store, li, lf, hpW, hpb, hpgb, parts, partf,
                         (optimizer or Adam()).code, self.seed, training=False,
                         folded=folded)

    def folded_scale(self, gb, st, eps):
        """s = gamma / sqrt(running_var + eps) in float64; eps rounded to the dtype first,
        as training adds it."""
        eps = float(self.dtype.type(eps))
        return (gb[contract.BN_GAMMA].astype(np.float64)
                / np.sqrt(st[contract.BN_VAR].astype(np.float64) + eps))

    def folded_bias(self, gb, st, b, eps):
        """The folded bias b' = (b - running_mean) * s + beta (in the dtype)."""
        s = self.folded_scale(gb, st, eps)
        b64 = b.astype(np.float64) if b.size else 0.0
        return ((b64 - st[contract.BN_MEAN].astype(np.float64)) * s
                + gb[contract.BN_BETA].astype(np.float64)).astype(self.dtype)

    def folded(self, l):
        """Block l with its BatchNorm folded in for inference (running statistics):
        W' = W * s, b' = (b - running_mean) * s + beta, s = gamma / sqrt(running_var + eps),
        in float64, rounded once to the dtype."""
        eps = self.blocks[l].bn.eps
        gb, st = self.store.tensor("gb", l), self.store.running_stats(l)
        W = self.store.tensor("W", l)
        s = self.folded_scale(gb, st, eps)
        return (np.ascontiguousarray(W.astype(np.float64) * s, self.dtype),
                self.folded_bias(gb, st, self.store.tensor("b", l), eps))

    # ------------------------------------------------------------ weights
    def tensors(self, kind, flat=None):
        """Every block's tensor `kind` ("W", "b", "gb") as views, in the global order (of
        the parameters, or of a gradient / moment buffer `flat`)."""
        return [self.store.tensor(kind, l, flat) for l in range(self.n_blocks)]

    def kernels(self):
        """Every block's W (views), in the global order."""
        return self.tensors("W")

    def biases(self):
        return self.tensors("b")

    def running_stats(self):
        """Every block's (2, O) BatchNorm running statistics, or an empty (0, 0)."""
        return [self.store.running_stats(l) for l in range(self.n_blocks)]

    def moments(self, which, kind):
        """Every block's moment `which` ("m", "v") of tensor `kind` (empty where the
        optimizer keeps none)."""
        return self.tensors(kind, getattr(self.store, which))

    def weight_list(self, parts=None):
        """The live arrays get_weights copies, in Keras' order: per block W, b, then for a
        BatchNorm after it gamma, beta, moving mean, moving variance (views)."""
        out = []
        ranges = self.part_ranges()
        for p in (range(len(self.parts)) if parts is None else parts):
            for l in range(*ranges[p]):
                out += [self.store.tensor("W", l), self.store.tensor("b", l)]
                if self.blocks[l].bn is not None:
                    gb, st = self.store.tensor("gb", l), self.store.running_stats(l)
                    out += [gb[contract.BN_GAMMA], gb[contract.BN_BETA],
                            st[contract.BN_MEAN], st[contract.BN_VAR]]
        return out

    def weight_names(self):
        """Names of weight_list()'s arrays: "<part>/dense_<i>/W", ".../b", and for a block
        with BatchNorm "<part>/batchnorm_<i>/gamma", "beta", "moving_mean",
        "moving_variance"."""
        out = []
        for part in self.parts:
            for i, blk in enumerate(part.blocks):
                out += [f"{part.label}/dense_{i}/W", f"{part.label}/dense_{i}/b"]
                if blk.bn is not None:
                    out += [f"{part.label}/batchnorm_{i}/{k}"
                            for k in ("gamma", "beta", "moving_mean", "moving_variance")]
        return out

    def assign_weights(self, weights, labels, layout):
        """set_weights: validate every new array against the live ones (count, shapes,
        finite real numbers), then copy them all in, or raise and change nothing."""
        if weights is None or isinstance(weights, (str, bytes)) \
                or not hasattr(weights, "__iter__"):
            raise TypeError(f"set_weights takes a list of arrays ({layout}), got "
                            f"{type(weights).__name__}")
        current = self.weight_list()
        weights = list(weights)
        if len(weights) != len(current):
            raise ValueError(f"set_weights expects {len(current)} arrays ({layout}), got "
                             f"{len(weights)}")
        converted = []
        for i, (new, cur) in enumerate(zip(weights, current)):
            try:
                arr = np.asarray(new)
            except Exception as exc:    # ragged lists and the like
                raise TypeError(f"weight {i}{labels[i]} is not an array: {exc}") from exc
            if arr.shape != cur.shape:
                raise ValueError(f"weight {i}{labels[i]} has shape {arr.shape}, expected "
                                 f"{cur.shape}")
            if np.iscomplexobj(arr):
                raise TypeError(f"weight {i}{labels[i]} must be real, got dtype {arr.dtype}")
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) \
                    or not np.isfinite(arr).all():
                raise ValueError(f"weight {i}{labels[i]} must be finite real numbers")
            with np.errstate(over="ignore"):
                conv = arr.astype(self.dtype)
            if not np.isfinite(conv).all():
                raise ValueError(f"weight {i}{labels[i]} overflows {self.dtype.name}")
            converted.append(conv)
        with interrupts.deferred():     # every array or none, even under Ctrl-C
            for cur, new in zip(current, converted):
                cur[...] = new

    def penalty(self):
        """The current regularization term of the weights, summed over every block (what
        history['penalty'] tracks, which also adds each training step's activity penalty:
        that one depends on the batch)."""
        from .optimizers import Adam
        _, _, hpW, hpb, _ = self.config_rows(Adam(), training=False)
        return float(sum(penalty_value(self.store.tensor("W", l), hpW[l])
                         + penalty_value(self.store.tensor("b", l), hpb[l])
                         for l in range(self.n_blocks)))

    # ------------------------------------------------------------ description
    def summary_lines(self, p):
        """One line per block of part p (fan-in, width, activation, dropout, noise,
        BatchNorm, parameters, regularizer)."""
        lines = []
        fan_ins = self.fan_ins(self.input_dim) if self.input_dim else [None] * self.n_blocks
        first = self.part_ranges()[p][0]
        for i, blk in enumerate(self.parts[p].blocks):
            d = blk.dense
            fan_in = fan_ins[first + i]
            if fan_in is None and p > 0 and self.input_dim is None:
                fan_in = None
            n = (fan_in * d.units + (d.units if d.use_bias else 0)) if fan_in else "?"
            extra = f", input dropout {blk.in_drop:.3g}" if blk.in_drop else ""
            if isinstance(blk.in_noise, AlphaDropout):
                extra += f", input {blk.in_noise!r}"
            elif blk.in_noise is not None:
                extra += f", input noise {blk.in_noise!r}"
            if isinstance(blk.noise, AlphaDropout):
                extra += f", output {blk.noise!r}"
            elif blk.noise is not None:
                extra += f", output noise {blk.noise!r} (before the dropout)"
            if blk.bn is not None:
                n = n + 4 * d.units if fan_in else n
                extra += (f", batchnorm(momentum={blk.bn.momentum:g}, "
                          f"eps={blk.bn.eps:g}) before the activation")
            if any(blk.activity):
                extra += (f", activity penalty (l1={blk.activity[0]:g}, "
                          f"l2={blk.activity[1]:g}) on its output / batch")
            lines.append(f"dense_{i}: {fan_in if fan_in else '?'}->{d.units} "
                         f"{d.activation or 'linear'}, dropout {blk.out_drop:.3g}{extra}, "
                         f"params {n}, regularizer {d.regularizer or None}"
                         + (f", weight noise {d.weight_noise:g} (training only)"
                            if d.weight_noise else ""))
        return lines
