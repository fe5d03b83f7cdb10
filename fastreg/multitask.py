"""MultiTask: a shared trunk with several named heads, each with its own loss and weight.

Multi-task learning as a regularizer (the "shared representation" of the overview article):
the trunk is trained by the summed, weighted gradients of every task, so it has to learn a
representation useful to all of them.

    model = fr.MultiTask(
        trunk=[fr.Dense(64, "relu", dropout=0.1), fr.Dense(32, "relu")],
        heads={"price": ([fr.Dense(1)], "mse", 1.0),
               "kind": ([fr.Dense(16, "relu"), fr.Dense(3)],
                        "sparse_categorical_crossentropy", 0.5)},
        input_dim=8, seed=0)
    model.compile(optimizer=fr.Adam(1e-3), backend="numba")     # loss_weights={...} optional
    model.fit(X, {"price": y1, "kind": y2}, epochs=20, batch_size=128,
              validation_data=(Xv, {"price": yv1, "kind": yv2}),
              callbacks=[fr.EarlyStopping("val_loss", patience=3)])
    model.predict(Xt)    # {"price": (n, 1) values, "kind": (n, 3) probabilities}

A head is given as (layers, loss) or (layers, loss, weight) (weight 1.0 by default), or as a
dict {"layers": ..., "loss": ..., "weight": ...}; heads keep the order of the `heads` dict.
The objective of a batch is  sum_h weight_h * loss_h  (each loss the batch mean, as in
Sequential) plus the penalties of every layer, trunk and heads.

One training step (``_forward_backward`` then ``_update``):
    trunk forward once -> every head forward on the trunk's output -> each head's fused
    loss + gradient, the gradient scaled by the head's weight -> head backward; the heads'
    input gradients are SUMMED (in head order) into the trunk's output gradient -> trunk
    backward -> the fused penalized update of every parameter tensor.
It runs the selected backend's per-op kernels (kernels/contract.py) from a Python loop over
layers; the workspace (activations, gradients, gathered batches) is allocated once per fit.

Dense layer numbering (the Philox layer word; DESIGN.md "Randomness"): the dense blocks are
numbered globally, trunk first, then each head in the order of `heads`:
    trunk block l          -> layer word l                       (l = 0 .. T-1)
    block j of head k      -> layer word T + n_0 + ... + n_{k-1} + j
(n_i the number of Dense layers of head i). A block's output dropout draws from
(step, its word, STREAM_DROPOUT). Input dropout (a Dropout before the first Dense of a part)
draws from (step, word of that part's first block, STREAM_INPUT_DROPOUT): word 0 for the
trunk's inputs; for a head, dropout on the trunk's output as that head alone sees it. Every
word is distinct and < 2**16 (never an MC-dropout word, philox.MC_LAYER_TAG), so no two
masks of a step share Philox bits, and a one-head MultiTask numbers its layers exactly as the
Sequential of trunk + head layers does (same masks, same trajectory).

Parameters (get_weights / set_weights / save) are in the same global order:
[W, b of trunk block 0, ..., W, b of the last trunk block, then each head's blocks in order]
(``weight_names()`` lists them). The per-layer penalties, constraints, MaxNorm and GroupLasso
are the layers' own, exactly as in Sequential; the trunk and every head are held as
Sequential "parts", whose compute nets (kernels/driver.Net) and snapshots this class reuses.

Not supported (yet) in a MultiTask: BatchNorm and noise layers (refused at construction),
fit(augment=...), predict(mc_samples=...), prune(). The per-op loop costs a few Python calls
per layer and step: about twice a Sequential's compiled epoch on small nets.
"""
import json
import math
import re
from collections.abc import Mapping
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np

from . import backend as backends
from . import layers as L
from . import model as M
from . import optimizers as O
from .callbacks import Callback
from .kernels import contract as C
from .kernels import threads
from .progress import EpochProgress
from .validation import as_features, as_targets, check_positive_int

FORMAT = "fastreg-multitask"
FORMAT_VERSION = 1
MAX_LAYER_WORDS = 1 << 16      # training layer words stay below philox.MC_LAYER_TAG's range
_HEAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


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
        raise TypeError(f"{where} must be a list of fastreg layers (Dense, Dropout), got "
                        f"{layers!r}")
    for layer in layers:
        if type(layer) not in (L.Dense, L.Dropout):
            raise TypeError(f"{where}: MultiTask supports Dense and Dropout layers, got "
                            f"{layer!r}")
    if not any(isinstance(layer, L.Dense) for layer in layers):
        raise ValueError(f"{where} needs at least one Dense layer")
    return list(layers)


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


class MultiTask:
    """A shared trunk and named heads: MultiTask(trunk, heads, input_dim=None, seed=0,
    dtype="float32"). See the module docstring for the head format, the training step, the
    Philox layer numbering and the parameter order."""

    def __init__(self, trunk, heads, input_dim=None, seed=0, dtype="float32"):
        trunk = _check_layers("the trunk", trunk)
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty dict {name: (layers, loss[, weight])}")
        parsed = {name: _parse_head(name, spec) for name, spec in heads.items()}
        # Parts: the trunk and every head as a Sequential (validates seed and dtype, folds
        # dropout into blocks, builds the compute nets); their parameters are ours.
        self._trunk = M.Sequential(trunk, seed=seed, dtype=dtype)
        self.seed, self.dtype = self._trunk.seed, self._trunk.dtype
        self.head_names = list(parsed)
        self._heads = {name: M.Sequential(layers, seed=seed, dtype=dtype)
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
        Every part is built by Sequential.build first (all its per-layer state), then its
        kernels are redrawn from the one generator (several parts drawing from the same seed
        would start correlated)."""
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

    def _moments(self, name):
        parts = [getattr(p, f"_{name}") for p in self._parts()]
        return None if any(x is None for x in parts) else [a for x in parts for a in x]

    _mW = property(lambda self: self._moments("mW"))
    _vW = property(lambda self: self._moments("vW"))
    _mb = property(lambda self: self._moments("mb"))
    _vb = property(lambda self: self._moments("vb"))

    def _ensure_optimizer_state(self):
        for p in self._parts():
            p._ensure_optimizer_state()

    def _reset_optimizer_state(self):
        for p in self._parts():
            p._reset_optimizer_state()

    def count_params(self):
        return sum(p.count_params() for p in self._parts())

    def weight_names(self):
        """Names of get_weights()'s arrays, e.g. "trunk/dense_0/W", "price/dense_0/b"."""
        out = []
        for label, part in zip(["trunk"] + self.head_names, self._parts()):
            for i in range(len(part._blocks())):
                out += [f"{label}/dense_{i}/W", f"{label}/dense_{i}/b"]
        return out

    def summary(self):
        lines = [f"MultiTask(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        fan_in = self.input_dim
        for k, (label, part) in enumerate(zip(["trunk"] + self.head_names, self._parts())):
            if k == 0:
                lines.append("  trunk:")
            else:
                lines.append(f"  head {label!r}: loss {self.losses[label]}, weight "
                             f"{self.loss_weights[label]:g}")
                fan_in = self.trunk_width if self.built else None
            for i, blk in enumerate(part._blocks()):
                d = blk["dense"]
                extra = f", input dropout {blk['in_drop']:.3g}" if blk["in_drop"] else ""
                lines.append(f"    dense_{i}: {fan_in or '?'}->{d.units} "
                             f"{d.activation or 'linear'}, dropout {blk['out_drop']:.3g}{extra}, "
                             f"regularizer {d.regularizer or None}")
                fan_in = d.units
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()

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
    def get_weights(self):
        """Copies, in the global order: trunk [W0, b0, ...] then each head's (weight_names)."""
        return [p.copy() for pair in zip(self._W, self._b) for p in pair]

    def set_weights(self, weights):
        """Replace the parameters (the order of get_weights); shapes must match. All-or-nothing."""
        if not self.built:
            raise ValueError("the model is not built yet: pass input_dim to MultiTask or call "
                             "fit/build first")
        weights = list(weights)
        current = [p for pair in zip(self._W, self._b) for p in pair]
        if len(weights) != len(current):
            raise ValueError(f"set_weights expects {len(current)} arrays (see "
                             f"weight_names()), got {len(weights)}")
        names = self.weight_names()
        converted = []
        for i, (new, cur) in enumerate(zip(weights, current)):
            arr = np.asarray(new)
            if arr.shape != cur.shape:
                raise ValueError(f"weight {i} ({names[i]}) has shape {arr.shape}, expected "
                                 f"{cur.shape}")
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                raise ValueError(f"weight {i} ({names[i]}) must be finite numbers")
            converted.append(arr.astype(self.dtype))
        for cur, new in zip(current, converted):
            cur[...] = new

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
        Sequential._make_net: references to the parameters), with their workspaces for
        batches of <= `batch` rows when batch is given (a head net's xbuf is unused: its
        inputs are the trunk's activations); scratch: a (batch, trunk width) buffer for the
        input gradient of every head after the first; bases: the parts' first layer words."""
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
        every net's dWs / dbs. Returns the heads' batch-mean losses (unweighted); when one
        is not finite, returns before the backward."""
        n = idx.shape[0]
        seed = self.seed
        nets, bases = ws.nets, ws.bases
        trunk = nets[0]
        xb = trunk.xbuf[:n]
        np.take(X, idx, axis=0, out=xb)
        x = xb
        if trunk.li[0, C.LI_IN_DROP_THR] > 0:
            ops.input_dropout(xb, trunk.xdrop[:n], trunk.li[0, C.LI_IN_DROP_THR],
                              trunk.lf[0, C.LF_IN_DROP_SCALE], seed, step, bases[0])
            x = trunk.xdrop[:n]
        inputs = [self._forward(ops, trunk, x, n, step, bases[0])]
        H = trunk.acts[-1][:n]
        losses = []
        for k, net in enumerate(nets[1:], start=1):
            yb = net.ybuf[:n]
            np.take(Ys[k - 1], idx, axis=0, out=yb)
            h = H
            if net.li[0, C.LI_IN_DROP_THR] > 0:
                ops.input_dropout(H, net.xdrop[:n], net.li[0, C.LI_IN_DROP_THR],
                                  net.lf[0, C.LF_IN_DROP_SCALE], seed, step, bases[k])
                h = net.xdrop[:n]
            inputs.append(self._forward(ops, net, h, n, step, bases[k]))
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
            self._backward(ops, net, inputs[k], n, step, bases[k], dh)
            if net.li[0, C.LI_IN_DROP_THR] > 0:   # back through the head's input dropout
                ops.input_dropout(dh, dh, net.li[0, C.LI_IN_DROP_THR],
                                  net.lf[0, C.LF_IN_DROP_SCALE], seed, step, bases[k])
            if k > 1:
                dH += dh
        self._backward(ops, trunk, inputs[0], n, step, bases[0], trunk.xbuf[:0])
        return losses

    @staticmethod
    def _forward(ops, net, x, n, step, base):
        inputs = []
        for l in range(net.n_layers):
            inputs.append(x)
            ops.dense_forward(x, net.Ws[l], net.bs[l], net.acts[l][:n], net.li[l, C.LI_ACT],
                              net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                              net.lf[l, C.LF_DROP_SCALE], net.seed, step, base + l)
            x = net.acts[l][:n]
        return inputs

    @staticmethod
    def _backward(ops, net, inputs, n, step, base, dx_in):
        """grads[-1] holds dL/d(output) on entry; dx_in gets dL/d(input) (size 0: skip)."""
        for l in range(net.n_layers - 1, -1, -1):
            dx = net.grads[l - 1][:n] if l > 0 else dx_in
            ops.dense_backward(net.grads[l][:n], net.acts[l][:n], inputs[l], net.Ws[l],
                               net.dWs[l], net.dbs[l], dx, net.li[l, C.LI_ACT],
                               net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                               net.lf[l, C.LF_DROP_SCALE], net.seed, step, base + l)

    @staticmethod
    def _update(ops, nets, t):
        """The fused penalized update of every tensor (last layer first, as the Sequential
        driver does); returns the summed penalty before the step."""
        pen = 0.0
        for net in reversed(nets):
            for l in range(net.n_layers - 1, -1, -1):
                pen += ops.penalized_update(net.Ws[l], net.dWs[l], net.mW[l], net.vW[l],
                                            net.hpW[l], net.opt, t)
                if net.bs[l].size:
                    pen += ops.penalized_update(net.bs[l], net.dbs[l], net.mb[l], net.vb[l],
                                                net.hpb[l], net.opt, t)
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

    def _objective_and_gradients(self, X, y, step=0):
        """For tests: sum_h w_h * loss_h of the batch (X, y) with the dropout masks of `step`
        and its gradients (in get_weights order), from the selected backend; no update."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0], "y")
        ws = self._workspace(X.shape[0], [Y.shape[1] for Y in Ys])
        losses = self._forward_backward(self._ops(), ws, X, Ys,
                                        np.arange(X.shape[0], dtype=np.int64), step)
        total = sum(self.loss_weights[h] * v for h, v in zip(self.head_names, losses))
        grads = [g.copy() for net in ws.nets for pair in zip(net.dWs, net.dbs) for g in pair]
        return total, grads

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1):
        """Train on X and y = {head: targets}; returns a History. A failed fit leaves the
        model as it was.

        History keys: "loss" (the weighted total sum_h w_h * loss_h), "loss_<head>" (each
        task's data loss, unweighted), "penalty"; with validation_data=(X_val, {head: ...}):
        "val_loss" (weighted total) and "val_loss_<head>". EarlyStopping may monitor any."""
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
        ops = self._ops()
        snapshot = self._snapshot()
        try:
            if not self.built:
                self.build(X.shape[1])
            return self._fit(ops, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose)
        except BaseException:
            self._restore(snapshot)
            raise

    def _keys(self, prefix):
        return [f"{prefix}loss"] + [f"{prefix}loss_{h}" for h in self.head_names]

    def _fit(self, ops, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose):
        available = set(self._keys("")) | {"penalty"} | (set(self._keys("val_")) if val
                                                          else set())
        history, cbs = M.begin_training(self, callbacks, available)
        n = X.shape[0]
        batch = min(batch_size, n)
        ws = self._workspace(batch, [Y.shape[1] for Y in Ys])   # once per fit
        weights = np.array([self.loss_weights[h] for h in self.head_names])
        n_batches = -(-n // batch_size)
        progress = EpochProgress(epochs, n_batches, verbose)
        try:
            with _thread_policy(ops, batch, self._W):
                for epoch in range(epochs):
                    perm = M.epoch_order(self, n, shuffle)
                    start_state = self._snapshot()
                    sums = np.zeros(len(self.head_names))
                    pen_sum = 0.0
                    steps_done = 0
                    finite = True
                    for first, last in progress.chunks(epoch):
                        s, p, steps, finite = self._train_steps(
                            ops, ws, X, Ys, perm[first * batch_size:last * batch_size],
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
        return M.end_training(self, history, cbs)

    def _stop_on_nonfinite(self, epoch, steps_done, start_state):
        """As Sequential: keep the last finite weights, else the start of the epoch; warn."""
        M.stop_on_nonfinite(self, self._W + self._b, epoch, steps_done, start_state,
                            "Lower the learning rate, check the data scale or the loss "
                            "weights.")

    # ------------------------------------------------------------ inference
    def _outputs(self, ops, X, batch_size=None):
        """{head: logits} for X, dropout off: the trunk once per chunk, then every head."""
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

    def predict(self, X, batch_size=None):
        """{head: outputs} for X, dropout off: probabilities for the cross-entropy heads."""
        X = as_features(X, "X", self.input_dim, self.dtype)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if not self.built:
            self.build(X.shape[1])
        ops = self._ops() if self.backend else backends.resolve(None)
        logits = self._outputs(ops, X, batch_size)
        return {h: ops.output_transform(z, C.LOSSES[self.losses[h]]) for h, z in logits.items()}

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
                "step": self._step, "t": self._t, "epochs_run": self._epochs_run}

    def save(self, path):
        """Write the model atomically: the config as JSON plus .npy members, no pickle; each
        part (k = 0 the trunk, k = 1.. the heads in order) stored as Sequential.save stores
        a model, its members prefixed "p<k>_". fr.load_model reads it back."""
        arrays = {"config": np.array(json.dumps(self.get_config()))}
        for k, part in enumerate(self._parts()):
            arrays.update({f"p{k}_{key}": a for key, a in M._model_arrays(part).items()})
        M._write_npz(path, arrays)


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
    return model


def _thread_policy(ops, batch, Ws):
    """The CPU backends' thread policy (kernels/threads.py) around the per-op epoch."""
    shape = SimpleNamespace(batch=batch, Ws=Ws)
    name = getattr(ops, "NAME", None)
    if name == "numba":
        return threads.numba_epoch(shape)
    if name == "cython":
        return threads.openmp_epoch(shape, ops._K.openmp_threads)
    return nullcontext()


__all__ = ["MultiTask", "FORMAT"]
