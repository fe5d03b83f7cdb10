"""MultiTask: a shared trunk with several named heads, each with its own loss and weight.

Multi-task learning as a regularizer (the "shared representation" of the overview article):
the trunk is trained by the summed, weighted gradients of every task, so it has to learn a
representation useful to all of them.

    model = fr.MultiTask(
        trunk=[fr.Dense(64, "relu", dropout=0.1), fr.BatchNorm(), fr.Dense(32, "relu")],
        heads={"price": ([fr.Dense(1)], "mse", 1.0),
               "kind": ([fr.GaussianNoise(0.1), fr.Dense(16, "relu"), fr.Dense(3)],
                        "sparse_categorical_crossentropy", 0.5)},
        input_dim=8, seed=0)
    model.compile(optimizer=fr.Adam(1e-3), backend="numba")     # loss_weights={...} optional
    model.fit(X, {"price": y1, "kind": y2}, epochs=20, batch_size=128,
              validation_data=(Xv, {"price": yv1, "kind": yv2}),
              callbacks=[fr.EarlyStopping("val_loss", patience=3)],
              augment=[fr.GaussianJitter(0.05)])
    model.predict(Xt)    # {"price": (n, 1) values, "kind": (n, 3) probabilities}
    model.predict(Xt, mc_samples=50, seed=0)   # {"price": (mean, std), "kind": (mean, std)}
    model.prune()        # dead units of trunk and heads removed (e.g. after GroupLasso)

A head is given as (layers, loss) or (layers, loss, weight) (weight 1.0 by default), or as a
dict {"layers": ..., "loss": ..., "weight": ...}; heads keep the order of the `heads` dict.
The objective of a batch is  sum_h weight_h * loss_h  (each loss the batch mean, as in
Sequential) plus the penalties of every layer, trunk and heads.

Layers: Dense, Dropout, BatchNorm, GaussianNoise, GaussianDropout, in the trunk and in every
head, with Sequential's placement rules, checked by Sequential's own validation (its messages,
prefixed with "the trunk: " or "head 'name': "). The trunk and every head are held as
Sequential "parts": their weights, BatchNorm parameters and running statistics, optimizer
moments, compute nets (kernels/driver.Net), snapshots, saved arrays and pruning are
Sequential's, reused. A Dropout / GaussianNoise / GaussianDropout first in a head acts on the
trunk's output as that head alone sees it (the head's input transform); a noise layer after
the trunk's last Dense acts on the trunk's output for every head.

One training step (``_forward_backward`` then ``_update``):
    trunk forward once -> every head forward on the trunk's output -> each head's fused
    loss + gradient, the gradient scaled by the head's weight -> head backward; the heads'
    input gradients are SUMMED (in head order) into the trunk's output gradient -> trunk
    backward -> the fused penalized update of every parameter tensor (W, b, and gamma/beta of
    a BatchNorm, never penalized).
A Dense with BatchNorm runs bn_dense_forward / bn_dense_backward with the batch statistics
(the backward updates its running statistics, once the step's loss is known finite); the
others dense_forward / dense_backward, with their output noise fused. Backward through a
head's input transform applies its dropout mask and, for GaussianDropout, its regenerated
factor (additive noise passes the gradient unchanged). It runs the selected backend's per-op
kernels (kernels/contract.py) from a Python loop over layers; the workspace (activations,
gradients, gathered batches) is allocated once per fit. Inference (predict, evaluate,
validation, MC dropout) folds every BatchNorm's running statistics into its W, b
(Sequential._make_net(training=False)) and runs without noise or dropout, except MC dropout.

Dense layer numbering (the Philox layer word; DESIGN.md "Randomness"): the dense blocks are
numbered globally, trunk first, then each head in the order of `heads`:
    trunk block l          -> layer word l                       (l = 0 .. T-1)
    block j of head k      -> layer word T + n_0 + ... + n_{k-1} + j
(n_i the number of Dense layers of head i). A block's output dropout and noise draw from
(step, its word, STREAM_DROPOUT / STREAM_NOISE). The input transform of a part (a Dropout or
noise layer before its first Dense) draws from (step, word of that part's first block,
STREAM_INPUT_DROPOUT / STREAM_INPUT_NOISE): word 0 for the trunk's inputs; for a head, the
trunk's output as that head alone sees it. Every word is distinct and < 2**16 (never an
MC-dropout word, philox.MC_LAYER_TAG), so no two draws of a step share Philox bits, and a
one-head MultiTask numbers its layers exactly as the Sequential of trunk + head layers does
(same masks, same noise, same trajectory).

augment= (fastreg.augment): the epoch's shuffled rows are augmented exactly as Sequential's
fit augments them (augment.augment_epoch: Philox streams keyed by the model seed, the
training step of the batch and the row in the batch), so a MultiTask sees the same input
batches as a Sequential with its seed. Mixup mixes every head's targets with the same
partner and lambda per row (one augment_epoch call over the heads' targets side by side; a
sparse_categorical_crossentropy head's targets become (label, partner's label, lambda) rows,
from the same draws); a head whose loss an augmenter refuses is named in the error.

MC dropout, predict(X, mc_samples=n, seed=None) -> {head: (mean, std)}: pass c stacks n
copies of each of R = driver.mc_rows_per_pass(n) rows of X (as Sequential's
driver.mc_dropout_forward does), runs the trunk ONCE over the stack, then every head on the
trunk's stacked output, so within a sample all heads see the same trunk masks. Layer words
are the training words tagged philox.mc_layer_word(word), step the pass counter step0 + c
(step0 = 0 with a seed, else the model's MC counter, saved). A one-head MultiTask draws
exactly what the Sequential of its layers draws.

prune(): model.PruneState per part (Sequential.prune's machinery): the trunk's layers in
order, then the trunk's last layer, whose dead units are folded into the first layer of
EVERY head (bias, or running mean with BatchNorm; removed only where every head can take the
constant), then each head's layers. Returns a MultiTaskPruneReport.

Parameters (get_weights / set_weights / save) are in the same global order, each part's
arrays in Sequential's order: [W, b (, gamma, beta, moving_mean, moving_variance for a Dense
with BatchNorm) of trunk block 0, ..., then each head's blocks in order]
(``weight_names()`` lists them). The per-layer penalties, constraints, MaxNorm and GroupLasso
are the layers' own, exactly as in Sequential.

The per-op loop costs a few Python calls per layer and step: about twice a Sequential's
compiled epoch on small nets.
"""
import json
import math
import re
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from . import augment as augmentation
from . import backend as backends
from . import layers as L
from . import model as M
from . import optimizers as O
from .callbacks import Callback
from .kernels import contract as C
from .kernels import driver, threads
from .kernels.philox import MASK32
from .progress import EpochProgress
from .validation import as_features, as_targets, check_positive_int

FORMAT = "fastreg-multitask"
FORMAT_VERSION = 1
MAX_LAYER_WORDS = 1 << 16      # training layer words stay below philox.MC_LAYER_TAG's range
_HEAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_LAYER_KINDS = "Dense, Dropout, BatchNorm, GaussianNoise, GaussianDropout"


def _check_weight(name, weight):
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer,
                                                           np.floating)) \
            or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"the loss weight of head {name!r} must be a finite number >= 0, "
                         f"got {weight!r}")
    return float(weight)


def _check_layers(where, layers):
    if isinstance(layers, L.Layer):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{where} must be a list of fastreg layers ({_LAYER_KINDS}), got "
                        f"{layers!r}")
    for layer in layers:
        if not isinstance(layer, L.Layer):
            raise TypeError(f"{where}: MultiTask takes fastreg layers ({_LAYER_KINDS}), got "
                            f"{layer!r}")
    if not any(isinstance(layer, L.Dense) for layer in layers):
        raise ValueError(f"{where} needs at least one Dense layer")
    return list(layers)


def _make_part(where, layers, seed, dtype):
    """A Sequential of `layers`, validated layer by layer by Sequential.add (BatchNorm and
    noise placement: Sequential's rules and messages, prefixed with `where`)."""
    part = M.Sequential(seed=seed, dtype=dtype)
    for layer in layers:
        try:
            part.add(layer)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return part


def _parse_head(name, spec):
    if not isinstance(name, str) or not _HEAD_NAME.match(name):
        raise ValueError(f"head names must be non-empty strings of letters, digits, '_', '.' "
                         f"or '-', got {name!r}")
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"layers", "loss", "weight"}
        if unknown:
            raise ValueError(f"head {name!r}: unknown keys {sorted(unknown)} (use layers, "
                             f"loss, weight)")
        if "layers" not in spec:
            raise ValueError(f"head {name!r} has no 'layers'")
        layers, loss, weight = spec["layers"], spec.get("loss", "mse"), spec.get("weight", 1.0)
    elif isinstance(spec, tuple) and len(spec) in (2, 3):
        layers, loss = spec[0], spec[1]
        weight = spec[2] if len(spec) == 3 else 1.0
    else:
        raise TypeError(f"head {name!r} must be (layers, loss) or (layers, loss, weight), or a "
                        f"dict with those keys; got {spec!r}")
    layers = _check_layers(f"head {name!r}", layers)
    if loss not in C.LOSSES:
        raise ValueError(f"head {name!r}: unknown loss {loss!r}; choose one of "
                         f"{sorted(C.LOSSES)}")
    last = [la for la in layers if isinstance(la, L.Dense)][-1]
    if loss != "mse" and last.activation is not None:
        raise ValueError(f"head {name!r}: {loss} takes logits: make its last Dense linear "
                         f"(activation=None); predict() returns the probabilities")
    if loss == "sparse_categorical_crossentropy" and last.units < 2:
        raise ValueError(f"head {name!r}: sparse_categorical_crossentropy needs a last Dense "
                         f"with one unit per class (>= 2 units)")
    return layers, loss, _check_weight(name, weight)


@dataclass(frozen=True)
class MultiTaskPruneReport(M.PruneReport):
    """What MultiTask.prune() removed. The lists of PruneReport run over every Dense layer in
    the global order (trunk, then each head: weight_names()); `parts` maps "trunk" and each
    head name to that part's own PruneReport."""
    parts: dict = None

    def __str__(self):
        widths = "; ".join(
            f"{label}: " + ", ".join(f"{a}->{b}" for a, b in zip(r.units_before,
                                                                 r.units_after))
            for label, r in self.parts.items())
        return (f"pruned {self.total_removed} units ({widths}); params "
                f"{self.params_before} -> {self.params_after}")


class MultiTask:
    """A shared trunk and named heads: MultiTask(trunk, heads, input_dim=None, seed=0,
    dtype="float32"). See the module docstring for the head format, the training step, the
    Philox layer numbering and the parameter order."""

    def __init__(self, trunk, heads, input_dim=None, seed=0, dtype="float32"):
        M.Sequential(seed=seed, dtype=dtype)    # seed and dtype: Sequential's checks
        trunk = _check_layers("the trunk", trunk)
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty dict {name: (layers, loss[, weight])}")
        parsed = {name: _parse_head(name, spec) for name, spec in heads.items()}
        # Parts: the trunk and every head as a Sequential (validates the layer sequence,
        # folds dropout and noise into blocks, builds the compute nets); their parameters
        # are ours.
        self._trunk = _make_part("the trunk", trunk, seed, dtype)
        self.seed, self.dtype = self._trunk.seed, self._trunk.dtype
        self.head_names = list(parsed)
        self._heads = {name: _make_part(f"head {name!r}", layers, seed, dtype)
                       for name, (layers, _, _) in parsed.items()}
        self.losses = {name: loss for name, (_, loss, _) in parsed.items()}
        self.loss_weights = {name: w for name, (_, _, w) in parsed.items()}
        for name, part in self._heads.items():
            part.loss = self.losses[name]
        if self._n_blocks() >= MAX_LAYER_WORDS:
            raise ValueError(f"a MultiTask takes fewer than {MAX_LAYER_WORDS} Dense layers")
        self.input_dim = None
        self._step = 0
        self._t = 0
        self._epochs_run = 0
        self._mc_step = 0
        self.optimizer = None
        self.backend = None
        self.history = None
        self.stop_training = False
        if input_dim is not None:
            self.build(input_dim)

    # ------------------------------------------------------------ structure
    @property
    def trunk_layers(self):
        return list(self._trunk.layers)

    def head_layers(self, name):
        return list(self._heads[name].layers)

    def _parts(self):
        """[trunk, head_0, head_1, ...]: the Sequential parts in the global order."""
        return [self._trunk] + [self._heads[n] for n in self.head_names]

    def _labels(self):
        return ["trunk"] + self.head_names

    def _bases(self):
        """The Philox layer word of every part's first block (module docstring)."""
        bases, base = [], 0
        for part in self._parts():
            bases.append(base)
            base += len(part._blocks())
        return bases

    def _n_blocks(self):
        return sum(len(p._blocks()) for p in self._parts())

    @property
    def built(self):
        return self._trunk.built

    @property
    def trunk_width(self):
        return self._trunk.n_outputs

    def build(self, input_dim):
        """Create the weights from the seed: one generator, trunk blocks then each head's in
        order (so a one-head model starts as the Sequential of trunk + head layers does).
        Every part is built by Sequential.build first (all its per-layer state: BatchNorm's
        gamma = 1, beta = 0, running mean 0 and variance 1), then its kernels are redrawn from
        the one generator (several parts drawing from the same seed would start
        correlated)."""
        input_dim = check_positive_int("input_dim", input_dim)
        rng = np.random.default_rng(self.seed)
        fan_in = input_dim
        for i, part in enumerate(self._parts()):
            if i == 1:
                fan_in = self.trunk_width
            part.build(fan_in)
            for W, blk in zip(part._W, part._blocks()):
                W[...] = M._init_kernel(blk["dense"].kernel_initializer, W.shape[0],
                                        W.shape[1], rng, self.dtype)
        self.input_dim = input_dim

    # Flat views (the arrays themselves, in the global order): used by get/set_weights,
    # save/load (model._write_model_file / _load_model_state) and the tests.
    @property
    def _W(self):
        return [W for p in self._parts() for W in p._W]

    @property
    def _b(self):
        return [b for p in self._parts() for b in p._b]

    @property
    def _bn(self):
        return [g for p in self._parts() for g in p._bn]

    @property
    def _bn_stats(self):
        return [s for p in self._parts() for s in p._bn_stats]

    def _moments(self, name):
        parts = [getattr(p, f"_{name}") for p in self._parts()]
        return None if any(x is None for x in parts) else [a for x in parts for a in x]

    _mW = property(lambda self: self._moments("mW"))
    _vW = property(lambda self: self._moments("vW"))
    _mb = property(lambda self: self._moments("mb"))
    _vb = property(lambda self: self._moments("vb"))
    _mbn = property(lambda self: self._moments("mbn"))
    _vbn = property(lambda self: self._moments("vbn"))

    def _ensure_optimizer_state(self):
        for p in self._parts():
            p._ensure_optimizer_state()

    def _reset_optimizer_state(self):
        for p in self._parts():
            p._reset_optimizer_state()

    def count_params(self):
        """Parameters of every part, BatchNorm's running statistics included (as Keras)."""
        return sum(p.count_params() for p in self._parts())

    def weight_names(self):
        """Names of get_weights()'s arrays, e.g. "trunk/dense_0/W", "price/dense_0/b", and
        for a Dense i with BatchNorm "trunk/batchnorm_i/gamma", ".../beta",
        ".../moving_mean", ".../moving_variance"."""
        out = []
        for label, part in zip(self._labels(), self._parts()):
            for i, blk in enumerate(part._blocks()):
                out += [f"{label}/dense_{i}/W", f"{label}/dense_{i}/b"]
                if blk["bn"] is not None:
                    out += [f"{label}/batchnorm_{i}/{k}"
                            for k in ("gamma", "beta", "moving_mean", "moving_variance")]
        return out

    def summary(self):
        """Print Sequential.summary() of every part (the heads' inputs: the trunk's output);
        returns the same text."""
        text = self._summary_text()
        print(text)
        return text

    def _summary_text(self):
        lines = [f"MultiTask(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        for label, part in zip(self._labels(), self._parts()):
            if label == "trunk":
                lines.append("  trunk:")
            else:
                lines.append(f"  head {label!r}: loss {self.losses[label]}, weight "
                             f"{self.loss_weights[label]:g}")
            lines += ["  " + line for line in part._summary_text().splitlines()[1:-1]]
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    def __repr__(self):
        return self._summary_text()

    # ------------------------------------------------------------ compile
    def compile(self, optimizer=None, backend=None, loss_weights=None):
        """Choose the optimizer (fresh state) and the backend (numba by default).

        loss_weights: optionally {head: weight >= 0} replacing the weights given with the
        heads (heads not named keep theirs), as Keras' compile(loss_weights=...)."""
        optimizer = O.get(optimizer)
        name = backends.name_of(backend)
        backends.resolve(name)  # fail now, with how to get it, not at fit time
        weights = dict(self.loss_weights)
        if loss_weights is not None:
            if not isinstance(loss_weights, Mapping):
                raise TypeError(f"loss_weights must be a dict {{head: weight}}, got "
                                f"{loss_weights!r}")
            self._check_names(loss_weights, "loss_weights", require_all=False)
            for head, w in loss_weights.items():
                weights[head] = _check_weight(head, w)
        self.loss_weights = weights
        self.optimizer, self.backend = optimizer, name
        for p in self._parts():
            p.optimizer, p.backend = optimizer, name
        self._t = 0
        self._reset_optimizer_state()

    def _require_compiled(self):
        if self.optimizer is None:
            raise RuntimeError("call model.compile(optimizer=...) before fit/evaluate")

    def _ops(self):
        return backends.resolve(self.backend)

    def _check_names(self, mapping, what, require_all=True):
        keys = list(mapping)
        bad = [k for k in keys if k not in self.losses]
        if bad:
            raise ValueError(f"{what} has unknown head(s) {bad}; the model's heads are "
                             f"{self.head_names}")
        missing = [h for h in self.head_names if h not in mapping]
        if require_all and missing:
            raise ValueError(f"{what} is missing head(s) {missing}; pass targets for every "
                             f"head of {self.head_names}")

    def _targets(self, y, n_rows, what):
        """{head: targets} -> [Y_h] in head order, validated and converted per head."""
        if not isinstance(y, Mapping):
            raise TypeError(f"{what} must be a dict {{head name: targets}} with the keys "
                            f"{self.head_names}, got {type(y).__name__}")
        self._check_names(y, what)
        return [as_targets(y[h], n_rows, C.LOSSES[self.losses[h]], self._heads[h].n_outputs,
                           f"{what}[{h!r}]", self.dtype) for h in self.head_names]

    # ------------------------------------------------------------ weights
    def _weight_list(self):
        """The live arrays get_weights copies: every part's Sequential._weight_list."""
        return [a for p in self._parts() for a in p._weight_list()]

    def get_weights(self):
        """Copies, in the global order: the trunk's Sequential.get_weights() list, then each
        head's (weight_names)."""
        return [a.copy() for a in self._weight_list()]

    def set_weights(self, weights):
        """Replace the parameters (the order of get_weights); shapes must match. All-or-nothing."""
        if not self.built:
            raise ValueError("the model is not built yet: pass input_dim to MultiTask or call "
                             "fit/build first")
        M.assign_weights(self._weight_list(), weights, self.dtype,
                         [f" ({name})" for name in self.weight_names()], "see weight_names()")

    def penalty(self):
        """The current regularization term, summed over every layer of trunk and heads."""
        return float(sum(p.penalty() for p in self._parts()))

    # ------------------------------------------------------------ state
    def _snapshot(self):
        return {"parts": [p._snapshot() for p in self._parts()], "step": self._step,
                "t": self._t, "epochs_run": self._epochs_run, "input_dim": self.input_dim}

    def _restore(self, snap):
        for p, s in zip(self._parts(), snap["parts"]):
            p._restore(s)
        self._step, self._t, self._epochs_run = snap["step"], snap["t"], snap["epochs_run"]
        self.input_dim = snap["input_dim"]

    def _workspace(self, batch=None, y_widths=None, training=True):
        """nets: the compute nets [trunk, head_0, ...] (driver.Net, built by the parts'
        Sequential._make_net: references to the parameters; training=False folds BatchNorm
        into W, b), with their workspaces for batches of <= `batch` rows when batch is given
        (a head net's xbuf is unused: its inputs are the trunk's activations); scratch: a
        (batch, trunk width) buffer for the input gradient of every head after the first;
        bases: the parts' first layer words."""
        nets = [self._trunk._make_net(batch, 0, training)]
        for k, h in enumerate(self.head_names):
            nets.append(self._heads[h]._make_net(batch, y_widths[k] if y_widths else 1,
                                                 training))
        for net in nets:
            net.seed = self.seed
        return SimpleNamespace(nets=nets, bases=self._bases(),
                               scratch=np.zeros((batch or 0, self.trunk_width), self.dtype))

    # ------------------------------------------------------------ one step
    def _forward_backward(self, ops, ws, X, Ys, idx, step):
        """Forward and backward of one batch (the rows idx of X and of every Ys[k]); fills
        every net's gradients (and, through the BatchNorm backward, the running
        statistics). Returns the heads' batch-mean losses (unweighted); when one is not
        finite, returns before the backward."""
        n = idx.shape[0]
        nets, bases = ws.nets, ws.bases
        trunk = nets[0]
        xb = trunk.xbuf[:n]
        np.take(X, idx, axis=0, out=xb)
        x = _input_transform(ops, trunk, xb, n, step, bases[0])
        inputs = [_forward(ops, trunk, x, n, step, bases[0])]
        H = trunk.acts[-1][:n]
        losses = []
        for k, net in enumerate(nets[1:], start=1):
            yb = net.ybuf[:n]
            np.take(Ys[k - 1], idx, axis=0, out=yb)
            h = _input_transform(ops, net, H, n, step, bases[k])
            inputs.append(_forward(ops, net, h, n, step, bases[k]))
            losses.append(float(ops.loss_forward_backward(net.acts[-1][:n], yb,
                                                          net.grads[-1][:n], net.loss)))
        if not all(np.isfinite(losses)):
            return losses
        dH = trunk.grads[-1][:n]
        for k, net in enumerate(nets[1:], start=1):
            w = self.loss_weights[self.head_names[k - 1]]
            if w != 1.0:
                g = net.grads[-1][:n]
                g *= self.dtype.type(w)
            dh = dH if k == 1 else ws.scratch[:n]
            _backward(ops, net, inputs[k], n, step, bases[k], dh)
            _input_transform_backward(ops, net, dh, step, bases[k])
            if k > 1:
                dH += dh
        _backward(ops, trunk, inputs[0], n, step, bases[0], trunk.xbuf[:0])
        return losses

    @staticmethod
    def _update(ops, nets, t):
        """The fused penalized update of every tensor (last layer first, as the Sequential
        driver does: W, b, then gamma/beta of a BatchNorm, flattened, never penalized);
        returns the summed penalty before the step."""
        pen = 0.0
        for net in reversed(nets):
            for l in range(net.n_layers - 1, -1, -1):
                pen += driver.layer_update(ops, net, l, t)
        return pen

    def _train_steps(self, ops, ws, X, Ys, perm, batch_size, step0, t0):
        """The batches of `perm`; returns (loss sums per head, penalty sum, steps, finite),
        sums weighted by batch rows as kernels/driver.train_epoch's."""
        sums = np.zeros(len(self.head_names))
        pen_sum = 0.0
        steps = 0
        for start in range(0, perm.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            n = idx.shape[0]
            losses = self._forward_backward(ops, ws, X, Ys, idx, step0 + steps)
            if not all(np.isfinite(losses)):
                return sums, pen_sum, steps, False
            sums += np.asarray(losses) * n
            pen_sum += self._update(ops, ws.nets, t0 + steps) * n
            steps += 1
        return sums, pen_sum, steps, True

    def _trainable(self):
        """(names, arrays) of the trained tensors in the global order: W, b of every dense
        block, then gamma, beta (views) of a BatchNorm: the order of
        _objective_and_gradients' gradients."""
        names, arrays = [], []
        for label, part in zip(self._labels(), self._parts()):
            for i, (W, b, gb) in enumerate(zip(part._W, part._b, part._bn)):
                names += [f"{label}/dense_{i}/W", f"{label}/dense_{i}/b"]
                arrays += [W, b]
                if gb.size:
                    names += [f"{label}/batchnorm_{i}/gamma", f"{label}/batchnorm_{i}/beta"]
                    arrays += [gb[C.BN_GAMMA], gb[C.BN_BETA]]
        return names, arrays

    def _objective_and_gradients(self, X, y, step=0):
        """For tests: sum_h w_h * loss_h of the batch (X, y) with the dropout masks and noise
        of `step` (BatchNorm: the batch statistics) and its gradients (in _trainable()'s
        order), from the selected backend; no update, the running statistics left as
        they were."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0], "y")
        ws = self._workspace(X.shape[0], [Y.shape[1] for Y in Ys])
        stats = [s.copy() for s in self._bn_stats]
        losses = self._forward_backward(self._ops(), ws, X, Ys,
                                        np.arange(X.shape[0], dtype=np.int64), step)
        for dst, src in zip(self._bn_stats, stats):
            dst[...] = src
        total = sum(self.loss_weights[h] * v for h, v in zip(self.head_names, losses))
        grads = []
        for net in ws.nets:
            for l in range(net.n_layers):
                grads += [net.dWs[l].copy(), net.dbs[l].copy()]
                if driver.bn_on(net, l):
                    grads += [net.dgbs[l][C.BN_GAMMA].copy(), net.dgbs[l][C.BN_BETA].copy()]
        return total, grads

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, augment=None, image_shape=None):
        """Train on X and y = {head: targets}; returns a History. A failed fit leaves the
        model as it was.

        History keys: "loss" (the weighted total sum_h w_h * loss_h), "loss_<head>" (each
        task's data loss, unweighted), "penalty"; with validation_data=(X_val, {head: ...}):
        "val_loss" (weighted total) and "val_loss_<head>". EarlyStopping may monitor any.
        augment / image_shape: as Sequential.fit (fastreg.augment), on the training batches
        only; Mixup mixes every head's targets with the same partner and lambda."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0], "y")
        epochs = check_positive_int("epochs", epochs)
        batch_size = check_positive_int("batch_size", batch_size)
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a tuple (X_val, {head: y_val})")
            Xv = as_features(validation_data[0], "X_val", X.shape[1], self.dtype)
            val = (Xv, self._targets(validation_data[1], Xv.shape[0], "y_val"))
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastreg Callback instances, got {cb!r}")
        plans = self._augment_plans(augment, X.shape[1], image_shape)
        ops = self._ops()
        snapshot = self._snapshot()
        try:
            if not self.built:
                self.build(X.shape[1])
            return self._fit(ops, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose,
                             plans)
        except BaseException:
            self._restore(snapshot)
            raise

    def _augment_plans(self, augment, width, image_shape):
        """One augment.prepare plan per head (for its loss), or None without augmentation.
        Checks that do not depend on a loss come first, unprefixed; a head whose loss an
        augmenter refuses (e.g. two Mixups with sparse labels) is named."""
        plan = augmentation.prepare(augment, width, C.LOSS_MSE, image_shape)
        if not plan:
            return None
        plans = []
        for h in self.head_names:
            try:
                plans.append(augmentation.prepare(augment, width, C.LOSSES[self.losses[h]],
                                                  image_shape))
            except ValueError as exc:    # every augmenter applies to every head's targets
                raise ValueError(f"head {h!r} ({self.losses[h]}): {exc}") from None
        return plans

    def _augment_epoch(self, plans, X, Ys, perm, batch_size):
        """The epoch's rows in training order, augmented as Sequential.fit augments them
        (augment.augment_epoch, at the model's step): (Xe, [Ye_h]). Heads whose plans
        are the same are augmented in one call, their targets side by side (mse and
        binary_crossentropy targets mix column by column), so every head's targets get the
        same partner and lambda; a sparse-label head gets its own call (the same draws: its
        Mixup targets become (label, partner's label, lambda) rows)."""
        mixes = any(isinstance(aug, augmentation.Mixup) for aug, _ in plans[0])
        if not mixes:   # the targets are not transformed: the inputs alone
            Xe, _ = augmentation.augment_epoch(plans[0], X, None, perm, batch_size, self.seed,
                                               self._step)
            return Xe, [np.ascontiguousarray(Y[perm]) for Y in Ys]
        groups = []     # [(plan, [head indices])]
        for k, plan in enumerate(plans):
            sparse = self.losses[self.head_names[k]] == "sparse_categorical_crossentropy"
            same = [g for g in groups if not sparse and g[2] is False
                    and [b for _, b in g[0]] == [b for _, b in plan]]
            if same:
                same[0][1].append(k)
            else:
                groups.append((plan, [k], sparse))
        Xe, Yes = None, [None] * len(Ys)
        for plan, members, _ in groups:
            Y = Ys[members[0]] if len(members) == 1 else np.hstack([Ys[k] for k in members])
            x, Ym = augmentation.augment_epoch(plan, X, Y, perm, batch_size, self.seed,
                                               self._step)
            Xe = x if Xe is None else Xe
            if len(members) == 1:
                Yes[members[0]] = Ym
            else:
                cuts = np.cumsum([Ys[k].shape[1] for k in members])[:-1]
                for k, part in zip(members, np.split(Ym, cuts, axis=1)):
                    Yes[k] = np.ascontiguousarray(part)
        return Xe, Yes

    def _keys(self, prefix):
        return [f"{prefix}loss"] + [f"{prefix}loss_{h}" for h in self.head_names]

    def _fit(self, ops, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose, plans):
        available = set(self._keys("")) | {"penalty"} | (set(self._keys("val_")) if val
                                                          else set())
        history, cbs = M.begin_training(self, callbacks, available)
        n = X.shape[0]
        batch = min(batch_size, n)
        widths = [Y.shape[1] for Y in Ys]
        if plans:   # the targets trained on: (label, label, lam) after a Mixup of sparse labels
            widths = [augmentation.target_width(plan, w) for plan, w in zip(plans, widths)]
        ws = self._workspace(batch, widths)   # once per fit
        weights = np.array([self.loss_weights[h] for h in self.head_names])
        n_batches = -(-n // batch_size)
        progress = EpochProgress(epochs, n_batches, verbose)
        try:
            with _thread_policy(ops, batch, self._W):
                for epoch in range(epochs):
                    perm = M.epoch_order(self, n, shuffle)
                    Xe, Yes = X, Ys
                    if plans:   # the epoch's rows in order, augmented (as Sequential._fit)
                        Xe, Yes = self._augment_epoch(plans, X, Ys, perm, batch_size)
                        perm = np.arange(n, dtype=np.int64)
                    start_state = self._snapshot()
                    sums = np.zeros(len(self.head_names))
                    pen_sum = 0.0
                    steps_done = 0
                    finite = True
                    for first, last in progress.chunks(epoch):
                        s, p, steps, finite = self._train_steps(
                            ops, ws, Xe, Yes, perm[first * batch_size:last * batch_size],
                            batch_size, self._step, self._t + 1)
                        sums += s
                        pen_sum += p
                        steps_done += steps
                        self._step += steps
                        self._t += steps
                        rows = min(n, (first + steps) * batch_size) if steps else 1
                        progress.update(epoch, first + steps,
                                        float(weights @ sums) / max(rows, 1))
                        if not finite:
                            break
                    if not finite:
                        self._stop_on_nonfinite(epoch, steps_done, start_state)
                        break
                    per_task = sums / n
                    logs = {"loss": float(weights @ per_task)}
                    logs.update({f"loss_{h}": float(v) for h, v in zip(self.head_names,
                                                                        per_task)})
                    logs["penalty"] = pen_sum / n
                    if val is not None:
                        logs.update({f"val_{k}": v
                                     for k, v in self._losses(ops, *val).items()})
                    if M.end_epoch(self, progress, cbs, epoch, logs):
                        break
        finally:
            progress.close()
        return M.end_training(self, history, cbs, progress)

    def _stop_on_nonfinite(self, epoch, steps_done, start_state):
        """As Sequential: keep the last finite weights, else the start of the epoch; warn."""
        M.stop_on_nonfinite(self, self._W + self._b + self._bn + self._bn_stats, epoch,
                            steps_done, start_state, "Lower the learning rate, check the data "
                            "scale or the loss weights.")

    # ------------------------------------------------------------ inference
    def _outputs(self, ops, X, batch_size=None):
        """{head: logits} for X, dropout and noise off, BatchNorm folded: the trunk once per
        chunk, then every head."""
        batch_size = batch_size or M.PREDICT_BATCH
        nets = self._workspace(training=False).nets
        out = {h: np.empty((X.shape[0], self._heads[h].n_outputs), self.dtype)
               for h in self.head_names}
        chunk = max(batch_size, M.PREDICT_BATCH)   # bounds the trunk's output held at once
        for start in range(0, X.shape[0], chunk):
            H = ops.forward_inference(nets[0], X[start:start + chunk], batch_size)
            for h, net in zip(self.head_names, nets[1:]):
                out[h][start:start + H.shape[0]] = ops.forward_inference(net, H, batch_size)
        return out

    def _losses(self, ops, X, Ys, batch_size=None):
        """{"loss": weighted total, "loss_<head>": ...} of the data losses, dropout off."""
        logits = self._outputs(ops, X, batch_size)
        per = {h: float(ops.loss_value(logits[h], Y, C.LOSSES[self.losses[h]]))
               for h, Y in zip(self.head_names, Ys)}
        out = {"loss": float(sum(self.loss_weights[h] * v for h, v in per.items()))}
        out.update({f"loss_{h}": v for h, v in per.items()})
        return out

    def evaluate(self, X, y, batch_size=None):
        """{"loss": sum_h w_h * loss_h, "loss_<head>": loss_h, ...}: data losses, dropout off."""
        self._require_compiled()
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0], "y")
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        return self._losses(self._ops(), X, Ys, batch_size)

    def predict(self, X, batch_size=None, mc_samples=None, seed=None):
        """{head: outputs} for X, dropout and noise off (BatchNorm: running statistics):
        probabilities for the cross-entropy heads.

        mc_samples=n (an int >= 1): MC dropout, {head: (mean, std)} over n samples per row,
        dropout and noise on as in training, each of shape (rows, outputs) (probabilities
        for the cross-entropies, population std; exactly 0 without any dropout or noise).
        Within a sample every head sees the same trunk masks: a batched pass runs the trunk
        once over the stacked samples, then every head on its output. seed=s: a pure
        function of (weights, X, n, s); seed=None: the model's seed and MC pass counter (as
        Sequential.predict; the counter is saved with the model)."""
        mc_samples, seed = M.check_mc_arguments(mc_samples, seed)
        X = as_features(X, "X", self.input_dim, self.dtype)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if not self.built:
            self.build(X.shape[1])
        ops = self._ops() if self.backend else backends.resolve(None)
        if mc_samples is not None:
            return self._predict_mc(ops, X, mc_samples, seed)
        logits = self._outputs(ops, X, batch_size)
        return {h: ops.output_transform(z, C.LOSSES[self.losses[h]]) for h, z in logits.items()}

    def _predict_mc(self, ops, X, n_samples, seed):
        """MC dropout over all parts: driver.mc_dropout_forward's stacking, pass rows and
        Philox counters, with the trunk's stacked output shared by every head."""
        nets = self._workspace(training=False).nets
        bases = self._bases()
        key, step0 = (self.seed, self._mc_step) if seed is None else (seed, 0)
        N = X.shape[0]
        n = int(n_samples)
        out = {h: (np.empty((N, net.Ws[-1].shape[1]), self.dtype),
                   np.zeros((N, net.Ws[-1].shape[1]), self.dtype))
               for h, net in zip(self.head_names, nets[1:])}
        if not any(driver.has_dropout(net) for net in nets):   # every sample is the same
            for h, p in self.predict(X).items():
                out[h][0][...] = p
            return out
        rows = driver.mc_rows_per_pass(n)
        stacked = min(rows, N) * n
        bufs = [_mc_buffers(net, stacked) for net in nets]
        passes = 0
        for start in range(0, N, rows):
            xs = np.repeat(X[start:start + rows], n, axis=0)
            m = xs.shape[0]
            step = (int(step0) + passes) & MASK32
            H = _mc_forward(ops, nets[0], bufs[0], xs, key, step, bases[0])
            for k, h in enumerate(self.head_names, start=1):
                z = _mc_forward(ops, nets[k], bufs[k], H, key, step, bases[k])
                K = z.shape[1]
                p = np.asarray(ops.output_transform(z, C.LOSSES[self.losses[h]]),
                               np.float64).reshape(m // n, n, K)
                out[h][0][start:start + m // n] = p.mean(axis=1)
                out[h][1][start:start + m // n] = p.std(axis=1)
            passes += 1
        if seed is None:
            self._mc_step = (self._mc_step + passes) % 2 ** 32
        return out

    # ------------------------------------------------------------ pruning
    def prune(self):
        """Remove dead units of the trunk and of every head; returns a MultiTaskPruneReport.

        Sequential.prune's rule, part by part (model.PruneState): a unit whose incoming
        column W[:, j] is exactly zero (what GroupLasso or L1 leave) outputs a constant at
        inference (f(b_j), or its folded BatchNorm bias), folded into the layers that read
        it. The trunk's last layer is read by the first layer of EVERY head: its dead unit j
        goes into each head's bias (or running mean, with BatchNorm), and is removed only
        when every head can take it (a head without bias or BatchNorm takes only zero
        contributions). Visiting order: the trunk's layers, its last layer, then each head's
        layers, so a head unit whose inputs all came from removed trunk units is found too.
        Heads' output layers and a layer's last unit are never removed. Optimizer moments
        shrink with the weights (fit continues without a new compile); the Dense layers are
        replaced by copies with the new widths (save / load_model see them). Predictions are
        unchanged up to float32 rounding."""
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        states = [M.PruneState(p) for p in self._parts()]
        trunk, heads = states[0], states[1:]
        T = len(trunk.Ws)
        for l in range(T - 1):
            trunk.prune_layer(l, [(trunk, l + 1)])
        trunk.prune_layer(T - 1, [(h, 0) for h in heads])
        for h in heads:
            for l in range(len(h.Ws) - 1):
                h.prune_layer(l, [(h, l + 1)])
        reports = [s.commit() for s in states]
        return MultiTaskPruneReport(
            removed=[x for r in reports for x in r.removed],
            units_before=[x for r in reports for x in r.units_before],
            units_after=[x for r in reports for x in r.units_after],
            params_before=sum(r.params_before for r in reports),
            params_after=self.count_params(),
            kept=[x for r in reports for x in r.kept],
            parts=dict(zip(self._labels(), reports)))

    # ------------------------------------------------------------ persistence
    def get_config(self):
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "trunk": [layer.get_config() for layer in self._trunk.layers],
                "heads": [{"name": h, "layers": [la.get_config() for la in
                                                 self._heads[h].layers],
                           "loss": self.losses[h], "weight": self.loss_weights[h]}
                          for h in self.head_names],
                "input_dim": self.input_dim, "seed": self.seed, "dtype": self.dtype.name,
                "compile": None if self.optimizer is None else {
                    "optimizer": self.optimizer.get_config(), "backend": self.backend},
                "step": self._step, "t": self._t, "epochs_run": self._epochs_run,
                "mc_step": self._mc_step}

    def save(self, path):
        """Write the model atomically: the config as JSON plus .npy members, no pickle; each
        part (k = 0 the trunk, k = 1.. the heads in order) stored as Sequential.save stores
        a model (BatchNorm arrays and optimizer moments included), its members prefixed
        "p<k>_". fr.load_model reads it back."""
        arrays = {"config": np.array(json.dumps(self.get_config()))}
        for k, part in enumerate(self._parts()):
            arrays.update({f"p{k}_{key}": a for key, a in M._model_arrays(part).items()})
        M._write_npz(path, arrays)

    # ------------------------------------------------------------ export (fastreg.export)
    def export(self, path, format="onnx", opset=None):
        """Write the ONNX inference graph, one output per head (named by the head), to
        `path`; `pip install "fastreg[onnx]"`."""
        from . import export as _export
        return _export.export(self, path, format=format, opset=opset)

    def to_keras(self):
        """The equivalent functional keras.Model whose outputs are {head: tensor}."""
        from . import export as _export
        return _export.to_keras(self)

    def to_torch(self):
        """The equivalent torch module (eval mode) whose forward returns {head: tensor}."""
        from . import export as _export
        return _export.to_torch(self)


def _from_config(cfg, files, backend=None):
    """The MultiTask of a saved file (fastreg.load_model reads the file and calls this)."""
    if cfg.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"written by a newer fastreg (multitask format {cfg['version']})")
    heads = {h["name"]: ([L.from_config(c) for c in h["layers"]], h["loss"], h["weight"])
             for h in cfg["heads"]}
    model = MultiTask([L.from_config(c) for c in cfg["trunk"]], heads, seed=cfg["seed"],
                      dtype=cfg["dtype"])
    if cfg["compile"] is not None:
        comp = cfg["compile"]
        model.compile(optimizer=O.get(comp["optimizer"]),
                      backend=M._backend_for_loading(comp["backend"], backend))
    if cfg["input_dim"] is not None:
        model.build(cfg["input_dim"])
        for k, part in enumerate(model._parts()):
            prefix = f"p{k}_"
            M._load_model_arrays(part, {key[len(prefix):]: a for key, a in files.items()
                                        if key.startswith(prefix)})
    model._step, model._t, model._epochs_run = cfg["step"], cfg["t"], cfg["epochs_run"]
    model._mc_step = int(cfg.get("mc_step", 0))   # absent in files of earlier versions
    return model


# ---------------------------------------------------------------- per-op passes of a part
def _forward(ops, net, x, n, step, base):
    """The training forward of a part's dense layers (Philox words base + l); returns each
    layer's input (what its backward reads)."""
    inputs = []
    for l in range(net.n_layers):
        inputs.append(x)
        driver.layer_forward(ops, net, l, x, n, step, base + l)
        x = net.acts[l][:n]
    return inputs


def _backward(ops, net, inputs, n, step, base, dx_in):
    """grads[-1] holds dL/d(output) on entry; dx_in gets dL/d(input) (size 0: skip). A
    BatchNorm layer's backward also updates its running statistics."""
    for l in range(net.n_layers - 1, -1, -1):
        dx = net.grads[l - 1][:n] if l > 0 else dx_in
        driver.layer_backward(ops, net, l, inputs[l], dx, n, step, base + l)


def _input_transform(ops, net, x, n, step, base):
    """A part's inputs after its input noise and dropout (into net.xdrop), or x itself."""
    if not driver.has_input_transform(net):
        return x
    ops.input_dropout(x, net.xdrop[:n], net.li[0, C.LI_IN_DROP_THR],
                      net.lf[0, C.LF_IN_DROP_SCALE], net.seed, step, base,
                      *driver.input_noise_of(net))
    return net.xdrop[:n]


def _input_transform_backward(ops, net, dh, step, base):
    """dh (in place) back through a part's input transform: the dropout mask and scale and,
    for GaussianDropout, its regenerated factor 1 + std * n (input_dropout applied to the
    gradient); additive noise passes the gradient unchanged."""
    if not driver.has_input_transform(net):
        return
    noise, std = driver.input_noise_of(net)
    if noise != C.NOISE_MUL:
        noise, std = C.NOISE_NONE, 0.0
    thr = net.li[0, C.LI_IN_DROP_THR]
    if thr > 0 or noise != C.NOISE_NONE:
        ops.input_dropout(dh, dh, thr, net.lf[0, C.LF_IN_DROP_SCALE], net.seed, step, base,
                          noise, std)


def _mc_buffers(net, rows):
    return SimpleNamespace(
        acts=[np.empty((rows, W.shape[1]), net.dtype) for W in net.Ws],
        xdrop=(np.empty((rows, net.Ws[0].shape[0]), net.dtype)
               if driver.has_input_transform(net) else None))


def _mc_forward(ops, net, bufs, x, seed, step, base):
    """One MC pass of a part over stacked rows (driver.mc_forward_pass, layer words from
    base)."""
    return driver.mc_forward_pass(ops, net, x, bufs.acts, bufs.xdrop, seed, step, base)


def _thread_policy(ops, batch, Ws):
    """The CPU backends' thread policy (kernels/threads.py) around the per-op epoch."""
    shape = SimpleNamespace(batch=batch, Ws=Ws)
    name = getattr(ops, "NAME", None)
    if name == "numba":
        return threads.numba_epoch(shape)
    if name == "cython":
        return threads.openmp_epoch(shape, ops._K.openmp_threads)
    return nullcontext()


__all__ = ["MultiTask", "MultiTaskPruneReport", "FORMAT"]
