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

Layers: Dense, Dropout, BatchNorm, GaussianNoise, GaussianDropout, AlphaDropout,
ActivityRegularization, in the trunk and in every head, with Sequential's placement rules and
messages (prefixed with "the trunk: " or "head 'name': "); Dense(activity_regularizer=...)
penalizes that layer's output in the trunk or a head alike (an ActivityRegularization first
in a head is refused: put it after the trunk's last Dense). A MultiTask is a front end of the one engine (fastreg/network.py): the
trunk and every head are parts of one network, trained by the backend's compiled epoch
(kernels/<backend>/epoch: trunk and heads in one call) exactly as a Sequential is; its
parameters, counters, snapshots, saved arrays and pruning are the network's. A Dropout /
GaussianNoise / GaussianDropout first in a head acts on the trunk's output as that head
alone sees it (the head's input transform); a noise layer after the trunk's last Dense acts
on the trunk's output for every head.

One training step (kernels/reference/epoch.py, the spec):
    trunk forward once -> every head forward on the trunk's output -> each head's fused
    loss + gradient, the gradient scaled by the head's weight -> head backward; the heads'
    input gradients are SUMMED (in head order) into the trunk's output gradient -> trunk
    backward -> the fused penalized update of every parameter tensor (W, b, and gamma/beta of
    a BatchNorm, never penalized), last layer first.
Inference (predict, evaluate, validation, MC dropout) folds every BatchNorm's running
statistics into its W, b and runs without noise or dropout, except MC dropout.

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
copies of each of R = mc.mc_rows_per_pass(n) rows of X (kernels/mc.py, as for a Sequential;
more than 8192 samples of a row are cut into passes of 8192), runs the trunk ONCE over the
stack, then every head on the trunk's stacked output, so within a sample all heads see the
same trunk masks. Layer words are the training words tagged philox.mc_layer_word(word),
step the pass counter step0 + c (step0 = 0 with a seed, else the model's MC counter,
saved). A one-head MultiTask draws exactly what the Sequential of its layers draws.

prune(): fastreg/pruning.py, as for a Sequential: the trunk's layers in order, then the
trunk's last layer, whose dead units are folded into the first layer of EVERY head (bias, or
running mean with BatchNorm; removed only where every head can take the constant), then each
head's layers. Returns a MultiTaskPruneReport.

Parameters (get_weights / set_weights / save) are in the same global order, each part's
arrays in Sequential's order: [W, b (, gamma, beta, moving_mean, moving_variance for a Dense
with BatchNorm) of trunk block 0, ..., then each head's blocks in order]
(``weight_names()`` lists them). The per-layer penalties, constraints, MaxNorm and GroupLasso
are the layers' own, exactly as in Sequential.

"""
import re
from collections.abc import Mapping

import numpy as np

from . import augment as augmentation
from . import backend as backends
from . import interrupts
from .layers import Dense, Layer, from_config as layer_from_config
from .metrics import names as metric_names, resolve as resolve_metrics
from . import optimizers
from . import pruning, saving, training
from .frontend import FrontEnd
from .kernels import contract
from .network import Network, Part, check_loss_and_last_layer, check_part_layers
from .pruning import MultiTaskPruneReport
from .validation import (as_features, as_sample_weight, as_targets, check_batch_size,
                         check_real, check_seed, check_width, feature_source)

FORMAT = "fastreg-multitask"
FORMAT_VERSION = 1
_HEAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_LAYER_KINDS = ("Dense, Dropout, BatchNorm, GaussianNoise, GaussianDropout, AlphaDropout, "
                "ActivityRegularization")


def _check_weight(name, weight):
    return check_real(f"the loss weight of head {name!r}", weight, 0.0)


def _check_layers(where, layers):
    if isinstance(layers, Layer):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{where} must be a list of fastreg layers ({_LAYER_KINDS}), got "
                        f"{layers!r}")
    for layer in layers:
        if not isinstance(layer, Layer):
            raise TypeError(f"{where}: MultiTask takes fastreg layers ({_LAYER_KINDS}), got "
                            f"{layer!r}")
    if not any(isinstance(layer, Dense) for layer in layers):
        raise ValueError(f"{where} needs at least one Dense layer")
    check_part_layers(list(layers), f"{where}: ")
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
    last = [la for la in layers if isinstance(la, Dense)][-1]
    loss = check_loss_and_last_layer(loss, last, where=f"head {name!r}: ")
    return layers, loss, _check_weight(name, weight)


class MultiTask(FrontEnd):
    """A shared trunk and named heads: MultiTask(trunk, heads, input_dim=None, seed=0,
    dtype="float32"). See the module docstring for the head format, the training step, the
    Philox layer numbering and the parameter order."""

    def __init__(self, trunk, heads, input_dim=None, seed=0, dtype="float32"):
        seed = check_seed("seed", seed)
        trunk = _check_layers("the trunk", trunk)
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty dict {name: (layers, loss[, weight])}")
        parsed = {name: _parse_head(name, spec) for name, spec in heads.items()}
        self._network = Network([Part("trunk", trunk)] + [
            Part(name, layers, loss, weight) for name, (layers, loss, weight) in parsed.items()],
            seed=seed, dtype=dtype)
        self.head_names = list(parsed)
        self.optimizer = None
        self.backend = None
        self.metrics = {}       # compile(metrics=...): {head: [fastreg.metrics.Metric]}
        self.history = None
        self.stop_training = False
        if input_dim is not None:
            self.build(input_dim)

    # ------------------------------------------------------------ structure
    @property
    def seed(self):
        return self._network.seed

    @property
    def input_dim(self):
        return self._network.input_dim

    @property
    def losses(self):
        return {p.label: p.loss for p in self._network.parts[1:]}

    @property
    def loss_weights(self):
        return {p.label: p.weight for p in self._network.parts[1:]}

    @property
    def trunk_layers(self):
        return list(self._network.parts[0].layers)

    def head_layers(self, name):
        return list(self._head(name).layers)

    def _head(self, name):
        return self._network.parts[1 + self.head_names.index(name)]

    @property
    def trunk_width(self):
        return self._network.n_outputs(0)

    def build(self, input_dim):
        """Create the weights from the seed: one generator, trunk blocks then each head's in
        order (so a one-head model starts as the Sequential of trunk + head layers does)."""
        self._network.build(check_width("input_dim", input_dim))

    def weight_names(self):
        """Names of get_weights()'s arrays, e.g. "trunk/dense_0/W", "price/dense_0/b", and
        for a Dense i with BatchNorm "trunk/batchnorm_i/gamma", ".../beta",
        ".../moving_mean", ".../moving_variance"."""
        return self._network.weight_names()

    def _summary_text(self):
        lines = [f"MultiTask(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        if self._network.inputs_line():
            lines.append("  " + self._network.inputs_line())
        for p, part in enumerate(self._network.parts):
            if p == 0:
                lines.append("  trunk:")
            else:
                lines.append(f"  head {part.label!r}: loss {part.loss}, weight "
                             f"{part.weight:g}")
            lines += ["    " + line for line in self._network.summary_lines(p)]
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    # ------------------------------------------------------------ compile
    def compile(self, optimizer=None, backend=None, loss_weights=None, metrics=None):
        """Choose the optimizer (fresh state) and the backend (cython when built, else numba).

        loss_weights: optionally {head: weight >= 0} replacing the weights given with the
        heads (heads not named keep theirs), as Keras' compile(loss_weights=...).
        metrics: as Sequential.compile's, {head: [names or callables]} (Keras' per-output
        dict) or one list for every head; reported as "<head>_<metric>" (History:
        "val_<head>_<metric>", evaluate's dict)."""
        optimizer = optimizers.get(optimizer)
        optimizer.check_dtype(self.dtype)
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
        metrics = self._resolve_metrics(metrics)
        with interrupts.deferred():     # all of it or nothing, even under Ctrl-C
            for head, w in weights.items():
                self._head(head).weight = w
            self.optimizer, self.backend = optimizer, name
            self.metrics = metrics
            self._network.counters.t = 0
            self._network.reset_optimizer_state()

    def _resolve_metrics(self, metrics):
        """{head: [Metric]} from compile's metrics argument (checked against each head's
        loss)."""
        if metrics is None:
            return {}
        if isinstance(metrics, Mapping):
            self._check_names(metrics, "metrics", require_all=False)
            given = dict(metrics)
        else:
            given = {h: metrics for h in self.head_names}
        return {h: resolve_metrics(given[h], self.losses[h]) for h in self.head_names if h in given
                and given[h] is not None}

    @property
    def _metric_list(self):
        """[(head index, log-key prefix, [Metric])] (training.evaluate)."""
        return [(k, f"{h}_", self.metrics[h]) for k, h in enumerate(self.head_names)
                if self.metrics.get(h)]

    def _metric_keys(self, prefix):
        return [f"{prefix}{h}_{m.name}" for h in self.head_names for m in
                self.metrics.get(h, [])]

    def _require_compiled(self):
        if self.optimizer is None:
            raise RuntimeError("call model.compile(optimizer=...) before fit/evaluate")

    def _check_names(self, mapping, what, require_all=True):
        keys = list(mapping)
        bad = [k for k in keys if k not in self.head_names]
        if bad:
            raise ValueError(f"{what} has unknown head(s) {bad}; the model's heads are "
                             f"{self.head_names}")
        missing = [h for h in self.head_names if h not in mapping]
        if require_all and missing:
            raise ValueError(f"{what} is missing head(s) {missing}; pass targets for every "
                             f"head of {self.head_names}")

    def _targets(self, y, n_rows, what="y"):
        """{head: targets} -> [Y_h] in head order, validated and converted per head."""
        if not isinstance(y, Mapping):
            raise TypeError(f"{what} must be a dict {{head name: targets}} with the keys "
                            f"{self.head_names}, got {type(y).__name__}")
        self._check_names(y, what)
        return [as_targets(y[h], n_rows, contract.LOSSES[self.losses[h]],
                           self._head(h).blocks[-1].dense.units, f"{what}[{h!r}]", self.dtype)
                for h in self.head_names]

    # ------------------------------------------------------------ weights
    def get_weights(self):
        """Copies, in the global order: the trunk's Sequential.get_weights() list, then each
        head's (weight_names)."""
        return [a.copy() for a in self._network.weight_list()] if self.built else []

    def set_weights(self, weights):
        """Replace the parameters (the order of get_weights); shapes must match. All-or-nothing."""
        if not self.built:
            raise ValueError("the model is not built yet: pass input_dim to MultiTask or call "
                             "fit/build first")
        self._network.assign_weights(weights, [f" ({n})" for n in self.weight_names()],
                                     "see weight_names()")

    # ------------------------------------------------------------ what the fit frame asks
    def _loss_logs(self, means):
        """{"loss": sum_h w_h * loss_h, "loss_<head>": loss_h} from the heads' mean losses."""
        weights = np.array([self.loss_weights[h] for h in self.head_names])
        logs = {"loss": float(weights @ means)}
        logs.update({f"loss_{h}": float(v) for h, v in zip(self.head_names, means)})
        return logs

    _nonfinite_advice = ("Lower the learning rate, check the data scale or the loss "
                         "weights.")

    def _keys(self, prefix):
        return [f"{prefix}loss"] + [f"{prefix}loss_{h}" for h in self.head_names]

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, augment=None, image_shape=None,
            validation_split=0.0, sample_weight=None):
        """Train on X and y = {head: targets}; returns a History, with Sequential.fit's
        guarantees (bad input, Ctrl-C, other failures, the checked state: fastreg/training.py).
        validation_split: as Sequential.fit (the last rows of X and of every head's targets).
        sample_weight: one array for every head's loss, or {head: weights} (Keras'
        per-output dict; heads not named weigh 1), as Sequential.fit; validation_data may
        carry them third, in the same form.

        History keys: "loss" (the weighted total sum_h w_h * loss_h), "loss_<head>" (each
        task's data loss, unweighted), "penalty"; with validation_data=(X_val, {head: ...}):
        "val_loss" (weighted total) and "val_loss_<head>". EarlyStopping may monitor any.
        augment / image_shape: as Sequential.fit (fastreg.augment), on the training batches
        only; Mixup mixes every head's targets with the same partner and lambda."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype, self._network.inputs_hint())
        Ys = self._targets(y, X.shape[0])
        epochs, batch_size, verbose, callbacks = training.check_fit_arguments(
            epochs, batch_size, verbose, callbacks)
        weights = self._sample_weights(sample_weight, X.shape[0])
        X, Ys, val, weights = training.split_validation(X, Ys, validation_split,
                                                        validation_data is not None, weights)
        if val is None:
            val = training.validation_pair(validation_data, X.shape[1], self.dtype,
                                           self._targets, "(X_val, {head: y_val})",
                                           self._sample_weights)
        plans = augmentation.prepare_heads(
            augment, X.shape[1], {h: self.losses[h] for h in self.head_names}, image_shape)
        backends.resolve(self.backend)
        available = set(self._keys("")) | {"penalty"} | set(self._metric_keys("")) | (
            set(self._keys("val_")) | set(self._metric_keys("val_")) if val else set())
        return training.fit(self, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose,
                            plans, available, weights)

    def _sample_weights(self, sample_weight, n_rows, name="sample_weight"):
        """[weights or None per head] from one array (every head) or {head: array}; None
        when not given."""
        if sample_weight is None:
            return None
        if isinstance(sample_weight, Mapping):
            self._check_names(sample_weight, name, require_all=False)
            return [None if sample_weight.get(h) is None else
                    as_sample_weight(sample_weight[h], n_rows, f"{name}[{h!r}]")
                    for h in self.head_names]
        w = as_sample_weight(sample_weight, n_rows, name)
        return [w] * len(self.head_names)

    def _augment_epoch(self, plans, X, Ys, perm, batch_size):
        return augmentation.augment_heads(plans, [self.losses[h] for h in self.head_names], X,
                                          Ys, perm, batch_size, self.seed,
                                          self._network.counters.step)

    # ------------------------------------------------------------ inference
    def evaluate(self, X, y, batch_size=None):
        """{"loss": sum_h w_h * loss_h, "loss_<head>": loss_h, "<head>_<metric>": ...}: data
        losses, dropout off, and the compiled metrics on the same pass's predictions."""
        self._require_compiled()
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        batch_size = check_batch_size(batch_size)
        X = feature_source(X, "X", self.input_dim, self.dtype,   # converted a chunk at a time
                           self._network.inputs_hint())
        Ys = self._targets(y, X.shape[0])
        return training.evaluate(self, X, Ys, batch_size)

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
        mc_samples, seed = training.check_mc_arguments(mc_samples, seed)
        batch_size = check_batch_size(batch_size)
        X = feature_source(X, "X", self.input_dim, self.dtype,   # converted a chunk at a time
                           self._network.inputs_hint())
        if not self.built:
            self.build(X.shape[1])
        if mc_samples is not None:
            return dict(zip(self.head_names, training.predict_mc(self, X, mc_samples, seed)))
        return dict(zip(self.head_names, training.predict_heads(self, X, batch_size)))

    # ------------------------------------------------------------ pruning
    def prune(self, inputs=False):
        """Remove dead units of the trunk and of every head (fastreg/pruning.py); returns a
        MultiTaskPruneReport. The trunk's last layer is read by the first layer of EVERY head:
        its dead unit j goes into each head's bias (or running mean, with BatchNorm), and is
        removed only when every head can take it. inputs=True: as Sequential.prune (the
        trunk's first layer reads the inputs)."""
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        before = self.count_params()
        with interrupts.deferred():
            reports = pruning.prune(self._network, inputs=bool(inputs))
        return MultiTaskPruneReport(
            removed=[x for r in reports for x in r.removed],
            units_before=[x for r in reports for x in r.units_before],
            units_after=[x for r in reports for x in r.units_after],
            params_before=before, params_after=self.count_params(),
            kept=[x for r in reports for x in r.kept],
            inputs_removed=reports[0].inputs_removed,
            parts=dict(zip(["trunk"] + self.head_names, reports)))

    # ------------------------------------------------------------ persistence
    def get_config(self):
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "trunk": [layer.get_config() for layer in self.trunk_layers],
                "heads": [{"name": h, "layers": [la.get_config() for la in
                                                 self.head_layers(h)],
                           "loss": self._head(h).loss_config(),
                           "weight": self.loss_weights[h]}
                          for h in self.head_names],
                "input_dim": self.input_dim, "seed": self.seed, "dtype": self.dtype.name,
                "compile": None if self.optimizer is None else {
                    "optimizer": self.optimizer.get_config(), "backend": self.backend,
                    **({"metrics": {h: metric_names(ms) for h, ms in self.metrics.items()
                                    if metric_names(ms)}}
                       if any(metric_names(ms) for ms in self.metrics.values()) else {})},
                **saving.input_columns_config(self._network),
                **saving.counters_config(self._network)}

    def save(self, path):
        """Write the model atomically: the config as JSON plus .npy members, no pickle; each
        part (k = 0 the trunk, k = 1.. the heads in order) stored as Sequential.save stores
        a model (BatchNorm arrays and optimizer moments included), its members prefixed
        "p<k>_". fr.load_model reads it back."""
        saving.save_network(path, self.get_config(), self._network)


def _load(cfg, arc, backend=None):
    """The MultiTask of a saved file (saving.load_model opens the archive and calls this):
    every member checked against the config before the model is built."""
    saving.check_version(cfg, FORMAT_VERSION, "multitask format")
    heads = {h["name"]: ([layer_from_config(c) for c in saving.config_list(h["layers"], "layers")],
                         h["loss"], h["weight"])
             for h in saving.config_list(cfg["heads"], "heads")}
    model = MultiTask([layer_from_config(c) for c in saving.config_list(cfg["trunk"], "trunk")],
                      heads, seed=cfg["seed"], dtype=cfg["dtype"])
    if cfg["compile"] is not None:
        comp = cfg["compile"]
        model.compile(optimizer=optimizers.get(comp["optimizer"]),
                      backend=saving.backend_for_loading(comp["backend"], backend),
                      metrics=comp.get("metrics"))
    counters = saving.read_counters(cfg)
    columns = saving.read_input_columns(cfg)
    if cfg["input_dim"] is not None:
        saving.load_state(model, arc, cfg["input_dim"])
        saving.set_input_columns(model._network, columns)
    saving.set_counters(model._network, counters)
    return model


saving.register(FORMAT, _load)

__all__ = ["MultiTask", "MultiTaskPruneReport", "FORMAT"]
