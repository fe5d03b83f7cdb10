"""Sequential: the Keras-like model, a front end of the one engine (fastreg/network.py).

It decides what to compute; fastreg.kernels computes it. A Sequential is a network of one
part (trunk and head at once): its layers, its loss, its parameters, counters and plans are
the network's; the fit frame and inference are fastreg/training.py's, persistence
fastreg/saving.py's, pruning fastreg/pruning.py's.
"""

import numpy as np

from . import augment as augmentation
from . import backend as backends
from . import distributed as distributed_training
from . import interrupts
from .layers import BatchNorm, Dense, Layer, from_config as layer_from_config
from .metrics import REGRESSION, loss_family, names as metric_names, resolve as resolve_metrics
from . import optimizers
from . import pruning, saving, training
from .frontend import FrontEnd
from .kernels import contract
from .network import Network, Part, check_in_model_dtype, check_loss_and_last_layer, fold_blocks
from .validation import (as_features, as_sample_weight, as_targets, check_batch_size,
                         class_sample_weight, check_seed, check_width,
                         feature_source)

FORMAT = "fastreg-model"
FORMAT_VERSION = 1
PREDICT_BATCH = training.PREDICT_BATCH


class Sequential(FrontEnd):
    """A stack of Dense layers (with dropout, BatchNorm and noise folded in), trained by
    fused kernels.

    Sequential(layers, input_dim=None, seed=0, dtype="float32"). The weights are created from
    `seed` when input_dim is known (here, or from X at the first fit/predict).
    """

    def __init__(self, layers=None, input_dim=None, seed=0, dtype="float32"):
        self._network = Network([Part("model", [])], seed=seed, dtype=dtype)
        for layer in layers or []:
            self.add(layer)
        self.loss = None
        self.optimizer = None
        self.backend = None
        self.metrics = []       # compile(metrics=...): fastreg.metrics.Metric objects
        self.history = None
        self.stop_training = False
        declared = self._declared_input_dim()
        if input_dim is not None and declared is not None \
                and check_width("input_dim", input_dim) != declared:
            raise ValueError(f"input_dim={input_dim} but the first layer declares an input "
                             f"width of {declared} (input_shape)")
        if input_dim is None:
            input_dim = declared
        if input_dim is not None:
            self.build(input_dim)

    def _declared_input_dim(self):
        """The width the first layer declares (Dense(input_shape=(n,)), Keras' way), or
        None; the model is built from it at construction, or at the first fit/predict when
        the layer was added later (X must then have that width)."""
        first = self.layers[0] if self.layers else None
        return getattr(first, "input_shape", None)

    # ------------------------------------------------------------ structure
    @property
    def layers(self):
        return self._network.parts[0].layers

    @property
    def seed(self):
        return self._network.seed

    @seed.setter
    def seed(self, value):
        self._network.seed = check_seed("seed", value)

    @property
    def input_dim(self):
        return self._network.input_dim if self.built else self._declared_input_dim()

    def add(self, layer):
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential takes fastreg layers (Dense, Dropout, BatchNorm, "
                            f"GaussianNoise, GaussianDropout, AlphaDropout, "
                            f"ActivityRegularization), got {layer!r}")
        if self.built:
            raise ValueError("layers must be added before the model is built")
        if self.layers and getattr(layer, "input_shape", None) is not None:
            raise ValueError("input_shape / input_dim belong on the model's first layer (or "
                             "pass Sequential(input_dim=...))")
        layers = self.layers + [layer]
        if isinstance(layer, BatchNorm) and not (self.layers
                                                 and isinstance(self.layers[-1], Dense)):
            after = type(self.layers[-1]).__name__ if self.layers else "nothing (first layer)"
            raise ValueError(f"BatchNorm must come right after a Dense: it normalizes that "
                             f"Dense's pre-activation x @ W + b; here it follows {after}")
        blocks = fold_blocks(layers, partial=True)  # placement errors now, the model untouched
        check_in_model_dtype(layer, self.dtype)
        part = self._network.parts[0]
        part.layers = layers
        part.blocks = blocks

    def _blocks(self):
        return fold_blocks(self.layers)

    @property
    def n_outputs(self):
        return self._blocks()[-1].dense.units

    def build(self, input_dim):
        input_dim = check_width("input_dim", input_dim)
        self._network.refold()
        self._blocks()      # a Sequential needs a Dense
        self._network.build(input_dim)

    def _summary_text(self):
        lines = [f"Sequential(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        if self._network.inputs_line():
            lines.append("  " + self._network.inputs_line())
        if self._network.parts[0].blocks:
            lines += ["  " + line for line in self._network.summary_lines(0)]
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    # ------------------------------------------------------------ compile
    def compile(self, loss="mse", optimizer=None, backend=None, metrics=None):
        """Choose the loss (a name or a fastreg.losses object; model.loss is its name), the
        optimizer (fresh state), the backend (cython when built, else numba) and the metrics:
        names ("accuracy", "precision", "recall", "f1", "auc", "mae", "mse", "r2") or
        callables f(y_true, y_pred) -> float (fastreg/metrics.py), reported for
        validation_data as val_<name> in History and by evaluate."""
        if isinstance(loss, (list, tuple)):     # (a dict is a saved loss config)
            raise TypeError(f"loss must be the name of a loss ({sorted(contract.LOSSES)}; "
                            f"one name: a Sequential has one output), got {loss!r}")
        optimizer = optimizers.get(optimizer)
        optimizer.check_dtype(self.dtype)
        name = backends.name_of(backend)
        backends.resolve(name)  # fail now, with how to get it, not at fit time
        loss = check_loss_and_last_layer(loss, self._blocks()[-1].dense)
        metrics = resolve_metrics(metrics, loss.name)
        with interrupts.deferred():     # all of it or nothing, even under Ctrl-C
            self.loss, self.optimizer, self.backend = loss.name, optimizer, name
            self.metrics = metrics
            self._network.parts[0].set_loss(loss)
            self._network.counters.t = 0
            self._network.reset_optimizer_state()

    def _require_compiled(self):
        if self.loss is None:
            raise RuntimeError("call model.compile(loss=..., optimizer=...) before fit/evaluate")

    # ------------------------------------------------------------ weights
    def get_weights(self):
        """[W0, b0, W1, b1, ...] (copies), W of shape (fan_in, fan_out). A Dense followed by a
        BatchNorm contributes W, b, gamma, beta, moving_mean, moving_variance (Keras' order)."""
        return [a.copy() for a in self._network.weight_list()] if self.built else []

    def set_weights(self, weights):
        """Replace the parameters; shapes must match exactly. All-or-nothing."""
        if not self.built:
            raise ValueError("the model is not built yet: pass input_dim to Sequential or "
                             "call fit/build first")
        n = len(self._network.weight_list())
        self._network.assign_weights(weights, [""] * n,
                                     "[W0, b0, ...], and gamma, beta, moving_mean, "
                                     "moving_variance after the W, b of a Dense with BatchNorm")

    # ------------------------------------------------------------ what the fit frame asks
    def _targets(self, y, n_rows, what="y"):
        return [as_targets(y, n_rows, contract.LOSSES[self.loss], self.n_outputs, what, self.dtype)]

    def _loss_logs(self, means):
        return {"loss": float(means[0])}

    @property
    def _metric_list(self):
        """[(head index, log-key prefix, [Metric])] (training.evaluate)."""
        return [(0, "", self.metrics)] if self.metrics else []

    def _augment_epoch(self, plans, X, Ys, perm, batch_size):
        Xe, Ye = augmentation.augment_epoch(plans[0], X, Ys[0], perm, batch_size, self.seed,
                                            self._network.counters.step)
        return Xe, [Ye]

    _nonfinite_advice = "Lower the learning rate or check the data scale."

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, augment=None, image_shape=None,
            validation_split=0.0, sample_weight=None, class_weight=None, distributed=None):
        """Train; returns a History.

        distributed="mpi": data-parallel training over the processes of `mpirun -n N
        python train.py` (mpi4py: `pip install "fastreg[mpi]"`), every rank given the same
        X and y; the result is the one-process fit of the same global batches to float32
        rounding, and rank 0 runs the callbacks and validation (fastreg/distributed.py,
        README "Data-parallel training with MPI").

        sample_weight (one number >= 0 per row) and class_weight ({label: weight}, the
        classification losses) weigh each row's loss, as Keras: a batch's loss is
        sum_r w_r l_r / B (so is the reported "loss"; both given: their product).
        validation_data may be (X_val, y_val, w_val): val_loss is then weighted the same
        way (the metrics are not weighted).

        validation_split=f (0 <= f < 1), as Keras: the last fraction f of the rows of X and
        y, taken before any shuffling, is held out as validation_data (not trained on); not
        together with validation_data.

        Bad input (any argument) raises before anything changes. A Ctrl-C stops the fit
        between two chunks of batches (well under a second) and propagates as
        KeyboardInterrupt, leaving the state of the last completed step: weights, optimizer
        moments and counters as after that step, model.history with the completed epochs. Any
        other exception puts the model back as it was before the fit. At the end of every
        epoch (and at a Ctrl-C) the state is checked: finite weights and optimizer moments
        that give a finite loss on the epoch's last batch; a state that fails, or a training
        loss that becomes NaN or inf, stops the fit with a RuntimeWarning and the last state
        that passed (the end of an earlier epoch, else the state before the fit)
        (fastreg/training.py).

        X is read in place when it is C-contiguous in the model's dtype (np.memmap too: it
        trains out of core), else converted once. augment: augmenters (fastreg.augment)
        applied in order to the training batches, seeded by the model (never to validation
        data); image_shape=(H, W) or (H, W, C) for the image augmenters that were not given
        one."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype, self._network.inputs_hint())
        Ys = self._targets(y, X.shape[0])
        epochs, batch_size, verbose, callbacks = training.check_fit_arguments(
            epochs, batch_size, verbose, callbacks)
        weights = self._sample_weights(sample_weight, class_weight, Ys[0], X.shape[0])
        X, Ys, val, weights = training.split_validation(X, Ys, validation_split,
                                                        validation_data is not None, weights)
        if val is None:
            val = training.validation_pair(
                validation_data, X.shape[1], self.dtype, self._targets,
                sample_weights=lambda w, n, name: [as_sample_weight(w, n, name)])
        plan = augmentation.prepare(augment, X.shape[1], contract.LOSSES[self.loss], image_shape)
        backends.resolve(self.backend)
        dist = distributed_training.resolve(distributed)
        if dist is not None:
            dist.check(self, X, Ys, weights, [plan] if plan else None)
        available = ({"loss", "penalty"} | {m.name for m in self.metrics}
                     | ({"val_loss"} | {f"val_{m.name}" for m in self.metrics} if val
                        else set()))
        return training.fit(self, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose,
                            [plan] if plan else None, available, weights, dist)

    def _sample_weights(self, sample_weight, class_weight, Y, n_rows):
        """[per-row weights] from fit's sample_weight and class_weight (their product), or
        None when neither is given."""
        if sample_weight is None and class_weight is None:
            return None
        w = np.ones(n_rows)
        if sample_weight is not None:
            w = w * as_sample_weight(sample_weight, n_rows)
        if class_weight is not None:
            w = w * class_sample_weight(class_weight, Y, loss_family(self.loss),
                                        self.n_outputs)
        return [w]

    # ------------------------------------------------------------ inference
    def predict(self, X, batch_size=None, mc_samples=None, seed=None):
        """Outputs for X, dropout off: probabilities for the cross-entropy losses.

        X is read a chunk of rows at a time (converted to the model dtype per chunk), so
        predict never holds a copy of all of X. mc_samples=n (an int >= 1): MC dropout (Gal &
        Ghahramani, 2016). Returns (mean, std) over n dropout masks per row, dropout on as in
        training (input dropout included), each of shape (rows, outputs); for the
        cross-entropies both are over probabilities; std is the population std (ddof=0),
        exactly 0 for a model without dropout. The n samples of a row run in batched forward
        passes of at most 8192 stacked rows (kernels/mc.py, whose passes depend on n only:
        batch_size does not apply). The masks come from the Philox streams of training,
        told apart by the layer word (contract.MC_LAYER_TAG): seed=s makes the result a pure
        function of (weights, X, n, s), the same on every backend up to float32 rounding;
        seed=None uses the model's seed and advances the model's MC pass counter, so
        successive calls draw fresh masks, reproducibly from the model's seed (the counter is
        saved with the model).
        """
        mc_samples, seed = training.check_mc_arguments(mc_samples, seed)
        batch_size = check_batch_size(batch_size)
        X = feature_source(X, "X", self.input_dim, self.dtype, self._network.inputs_hint())
        if not self.built:
            self.build(X.shape[1])
        if mc_samples is not None:
            return training.predict_mc(self, X, mc_samples, seed)[0]
        # not compiled: the outputs as they are, or their softmax after a "softmax" last
        # Dense (training.head_losses)
        return training.predict_heads(self, X, batch_size)[0]

    def predict_proba(self, X, batch_size=None):
        """Class probabilities for X (scikit-learn's name), dropout off: softmax rows for
        sparse/categorical cross-entropy, sigmoid outputs for binary_crossentropy (one
        column: the positive class's, as Keras' predict; scikit-learn's two columns come from
        fastreg.sklearn.FastRegClassifier)."""
        self._require_classifier("predict_proba")
        return self.predict(X, batch_size)

    def predict_classes(self, X, batch_size=None):
        """Predicted labels for X (what Keras' removed predict_classes returned): the argmax
        of the softmax rows, or (probability >= 0.5) as 0/1 for binary_crossentropy (per
        output: multi-label models get one column per label)."""
        self._require_classifier("predict_classes")
        p = self.predict(X, batch_size)
        if self.loss == "binary_crossentropy":
            labels = (p >= 0.5).astype(np.int64)
            return labels[:, 0] if labels.shape[1] == 1 else labels
        return p.argmax(axis=1)

    def _require_classifier(self, what):
        self._require_compiled()
        if loss_family(self.loss) == REGRESSION:
            raise ValueError(f"{what} needs a classification loss; the loss is {self.loss!r} "
                             f"(use predict)")

    def diagnose(self, X_tr, y_tr, X_val, y_val, baseline=0.0, metric="loss", **thresholds):
        """The bias/variance verdict of the overfitting guide on this model (see
        fastreg.diagnose): metric="loss" (percent of the constant predictor's loss) or
        "error" (classification error rate in percent); baseline in the same units."""
        from .diagnose import diagnose_model
        return diagnose_model(self, X_tr, y_tr, X_val, y_val, baseline=baseline, metric=metric,
                              **thresholds)

    def evaluate(self, X, y, batch_size=None, return_dict=False, sample_weight=None):
        """The data loss (no penalty: neither the weights' nor an activity penalty, which
        history["penalty"] reports in training) on (X, y), dropout off (X read a chunk of
        rows at a time, as predict reads it), as Keras: the loss, or [loss, metric, ...]
        when metrics were compiled; return_dict=True: {"loss": ..., "<metric>": ...}
        (Keras' evaluate adds its regularization losses). The metrics come
        from the same inference pass as the loss; sample_weight weighs the loss as fit's
        does."""
        self._require_compiled()
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        batch_size = check_batch_size(batch_size)
        X = feature_source(X, "X", self.input_dim, self.dtype, self._network.inputs_hint())
        Ys = self._targets(y, X.shape[0])
        weights = (None if sample_weight is None
                   else [as_sample_weight(sample_weight, X.shape[0])])
        logs = training.evaluate(self, X, Ys, batch_size, weights)
        if return_dict:
            return logs
        return [logs["loss"]] + [logs[m.name] for m in self.metrics] if self.metrics \
            else logs["loss"]

    # ------------------------------------------------------------ pruning
    def prune(self, inputs=False):
        """Remove dead hidden units physically; returns a PruneReport (fastreg/pruning.py:
        the rule, the folding of their constants into the next layer's bias or BatchNorm
        running mean, the moments shrinking with the weights so fit continues).
        inputs=True also removes the input columns selected_features() finds dropped: the
        model then takes X[:, model.input_columns] (summary() and the saved file say so)."""
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        before = self.count_params()
        with interrupts.deferred():
            (report,) = pruning.prune(self._network, inputs=bool(inputs))
        return pruning.PruneReport(report.removed, report.units_before, report.units_after,
                                   before, self.count_params(), report.kept,
                                   report.inputs_removed)

    # ------------------------------------------------------------ persistence
    def get_config(self):
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "layers": [layer.get_config() for layer in self.layers],
                "input_dim": self._network.input_dim, "seed": self.seed,
                "dtype": self.dtype.name,
                "compile": None if self.loss is None else {
                    "loss": self._network.parts[0].loss_config(),
                    "optimizer": self.optimizer.get_config(),
                    "backend": self.backend,
                    **({"metrics": metric_names(self.metrics)}
                       if metric_names(self.metrics) else {})},
                **saving.input_columns_config(self._network),
                **saving.counters_config(self._network)}

    def save(self, path):
        """Write the model (config as JSON, arrays as .npy members) to `path` atomically
        (a new file gets 0o666 less the umask, an existing one keeps its mode, a symlink is
        written through: fastreg/modelfile.py)."""
        saving.save_network(path, self.get_config(), self._network)


def _load(cfg, arc, backend=None):
    """The Sequential of a saved file (saving.load_model opens the archive and calls this):
    every member checked against the config before the model is built."""
    saving.check_version(cfg, FORMAT_VERSION, "model format")
    model = Sequential([layer_from_config(c) for c in saving.config_list(cfg["layers"], "layers")],
                       seed=cfg["seed"], dtype=cfg["dtype"])
    if cfg["compile"] is not None:
        comp = cfg["compile"]
        model.compile(loss=comp["loss"], optimizer=optimizers.get(comp["optimizer"]),
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
load_model = saving.load_model
