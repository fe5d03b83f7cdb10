"""Sequential: the Keras-like model, a front end of the one engine (fastreg/network.py).

It decides what to compute; fastreg.kernels computes it. A Sequential is a network of one
part (trunk and head at once): its layers, its loss, its parameters, counters and plans are
the network's; the fit frame and inference are fastreg/training.py's, persistence
fastreg/saving.py's, pruning fastreg/pruning.py's.
"""
import numpy as np

from . import augment as augmentation
from . import backend as backends
from . import layers as L
from . import optimizers as O
from . import pruning, saving, training
from .kernels import contract as C
from .network import Network, Part, check_loss_and_last_layer, fold_blocks
from .validation import as_features, as_targets, check_positive_int

FORMAT = "fastreg-model"
FORMAT_VERSION = 1
PREDICT_BATCH = training.PREDICT_BATCH


class Sequential:
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
        self.history = None
        self.stop_training = False
        if input_dim is not None:
            self.build(input_dim)

    # ------------------------------------------------------------ structure
    @property
    def layers(self):
        return self._network.parts[0].layers

    @property
    def seed(self):
        return self._network.seed

    @seed.setter
    def seed(self, value):
        from .network import check_seed
        self._network.seed = check_seed(value)

    @property
    def dtype(self):
        return self._network.dtype

    @property
    def input_dim(self):
        return self._network.input_dim

    def add(self, layer):
        if not isinstance(layer, L.Layer):
            raise TypeError(f"Sequential takes fastreg layers (Dense, Dropout, BatchNorm, "
                            f"GaussianNoise, GaussianDropout, AlphaDropout), got {layer!r}")
        if self.built:
            raise ValueError("layers must be added before the model is built")
        layers = self.layers + [layer]
        if isinstance(layer, L.BatchNorm) and not (self.layers
                                                   and isinstance(self.layers[-1], L.Dense)):
            after = type(self.layers[-1]).__name__ if self.layers else "nothing (first layer)"
            raise ValueError(f"BatchNorm must come right after a Dense: it normalizes that "
                             f"Dense's pre-activation x @ W + b; here it follows {after}")
        blocks = fold_blocks(layers, partial=True)  # placement errors now, the model untouched
        part = self._network.parts[0]
        part.layers = layers
        part.blocks = blocks

    @property
    def built(self):
        return self._network.built

    def _blocks(self):
        return fold_blocks(self.layers)

    @property
    def n_outputs(self):
        return self._blocks()[-1].dense.units

    def build(self, input_dim):
        input_dim = check_positive_int("input_dim", input_dim)
        self._network.refold()
        self._blocks()      # a Sequential needs a Dense
        self._network.build(input_dim)

    def count_params(self):
        """Parameters of all layers, BatchNorm's running statistics included (as Keras)."""
        return self._network.count_params()

    def summary(self):
        """Print the layers, their shapes and parameter counts (as Keras does); returns the
        same text."""
        text = self._summary_text()
        print(text)
        return text

    def _summary_text(self):
        lines = [f"Sequential(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        if self._network.parts[0].blocks:
            lines += ["  " + line for line in self._network.summary_lines(0)]
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    def __repr__(self):
        return self._summary_text()

    # ------------------------------------------------------------ compile
    def compile(self, loss="mse", optimizer=None, backend=None):
        """Choose the loss (a name or a fastreg.losses object; model.loss is its name), the
        optimizer (fresh state) and the backend (cython when built, else numba)."""
        optimizer = O.get(optimizer)
        name = backends.name_of(backend)
        backends.resolve(name)  # fail now, with how to get it, not at fit time
        loss = check_loss_and_last_layer(loss, self._blocks()[-1].dense)
        self.loss, self.optimizer, self.backend = loss.name, optimizer, name
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

    def penalty(self):
        """The current regularization term sum over layers (what history['penalty'] tracks)."""
        return self._network.penalty()

    # ------------------------------------------------------------ what the fit frame asks
    def _targets(self, y, n_rows, what="y"):
        return [as_targets(y, n_rows, C.LOSSES[self.loss], self.n_outputs, what, self.dtype)]

    def _loss_logs(self, means):
        return {"loss": float(means[0])}

    def _augment_epoch(self, plans, X, Ys, perm, batch_size):
        Xe, Ye = augmentation.augment_epoch(plans[0], X, Ys[0], perm, batch_size, self.seed,
                                            self._network.counters.step)
        return Xe, [Ye]

    _nonfinite_advice = "Lower the learning rate or check the data scale."

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, augment=None, image_shape=None):
        """Train; returns a History. A failed fit leaves the model as it was.

        augment: augmenters (fastreg.augment) applied in order to the training batches, seeded
        by the model (never to validation data); image_shape=(H, W) or (H, W, C) for the image
        augmenters that were not given one."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0])
        epochs, batch_size, callbacks = training.check_fit_arguments(epochs, batch_size,
                                                                     verbose, callbacks)
        val = training.validation_pair(validation_data, X.shape[1], self.dtype, self._targets)
        plan = augmentation.prepare(augment, X.shape[1], C.LOSSES[self.loss], image_shape)
        backends.resolve(self.backend)
        snapshot = self._network.snapshot()
        try:
            if not self.built:
                self.build(X.shape[1])
            available = {"loss", "penalty"} | ({"val_loss"} if val else set())
            return training.run_fit(self, X, Ys, epochs, batch_size, val, shuffle, callbacks,
                                    verbose, [plan] if plan else None, available)
        except BaseException:
            self._network.restore(snapshot)
            raise

    # ------------------------------------------------------------ inference
    def predict(self, X, batch_size=None, mc_samples=None, seed=None):
        """Outputs for X, dropout off: probabilities for the cross-entropy losses.

        mc_samples=n (an int >= 1): MC dropout (Gal & Ghahramani, 2016). Returns (mean, std)
        over n dropout masks per row, dropout on as in training (input dropout included), each
        of shape (rows, outputs); for the cross-entropies both are over probabilities; std is
        the population std (ddof=0), exactly 0 for a model without dropout. The n samples of a
        row run in one batched forward pass (kernels/mc.py, whose rows per pass depend on n
        only: batch_size does not apply). The masks come from the Philox streams of training,
        told apart by the layer word (contract.MC_LAYER_TAG): seed=s makes the result a pure
        function of (weights, X, n, s), the same on every backend up to float32 rounding;
        seed=None uses the model's seed and advances the model's MC pass counter, so
        successive calls draw fresh masks, reproducibly from the model's seed (the counter is
        saved with the model).
        """
        mc_samples, seed = training.check_mc_arguments(mc_samples, seed)
        X = as_features(X, "X", self.input_dim, self.dtype)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if not self.built:
            self.build(X.shape[1])
        if mc_samples is not None:
            return training.predict_mc(self, X, mc_samples, seed)[0]
        # not compiled: the outputs as they are, or their softmax after a "softmax" last
        # Dense (training.head_losses)
        return training.predict_heads(self, X, batch_size)[0]

    def diagnose(self, X_tr, y_tr, X_val, y_val, baseline=0.0, metric="loss", **thresholds):
        """The bias/variance verdict of the overfitting guide on this model (see
        fastreg.diagnose): metric="loss" (percent of the constant predictor's loss) or
        "error" (classification error rate in percent); baseline in the same units."""
        from .diagnose import diagnose_model
        return diagnose_model(self, X_tr, y_tr, X_val, y_val, baseline=baseline, metric=metric,
                              **thresholds)

    def evaluate(self, X, y, batch_size=None):
        """The data loss (no penalty) on (X, y), dropout off."""
        self._require_compiled()
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        X = as_features(X, "X", self.input_dim, self.dtype)
        Ys = self._targets(y, X.shape[0])
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        return training.evaluate(self, X, Ys, batch_size)["loss"]

    # ------------------------------------------------------------ pruning
    def prune(self):
        """Remove dead hidden units physically; returns a PruneReport (fastreg/pruning.py:
        the rule, the folding of their constants into the next layer's bias or BatchNorm
        running mean, the moments shrinking with the weights so fit continues)."""
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        before = self.count_params()
        (report,) = pruning.prune(self._network)
        return pruning.PruneReport(report.removed, report.units_before, report.units_after,
                                   before, self.count_params(), report.kept)

    # ------------------------------------------------------------ persistence
    def get_config(self):
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "layers": [layer.get_config() for layer in self.layers],
                "input_dim": self.input_dim, "seed": self.seed, "dtype": self.dtype.name,
                "compile": None if self.loss is None else {
                    "loss": self._network.parts[0].loss_config(),
                    "optimizer": self.optimizer.get_config(),
                    "backend": self.backend},
                **saving.counters_config(self._network)}

    def save(self, path):
        """Write the model (config as JSON, arrays as .npy members) to `path` atomically."""
        saving.save_network(path, self.get_config(), self._network)

    def export(self, path, format="onnx", opset=None):
        """Write the ONNX inference graph (BatchNorm folded, no dropout or noise, the loss's
        sigmoid/softmax on the output) to `path`; `pip install "fastreg[onnx]"`."""
        from . import export as _export
        return _export.export(self, path, format=format, opset=opset)

    def to_keras(self):
        """The equivalent keras.Sequential (Keras 3; same weights and predictions)."""
        from . import export as _export
        return _export.to_keras(self)

    def to_torch(self):
        """The equivalent torch.nn.Sequential, in eval mode (same weights and predictions)."""
        from . import export as _export
        return _export.to_torch(self)


def _load(cfg, files, backend=None):
    """The Sequential of a saved file (saving.load_model reads the file and calls this)."""
    saving.check_version(cfg, FORMAT_VERSION)
    model = Sequential([L.from_config(c) for c in cfg["layers"]], seed=cfg["seed"],
                       dtype=cfg["dtype"])
    if cfg["compile"] is not None:
        comp = cfg["compile"]
        model.compile(loss=comp["loss"], optimizer=O.get(comp["optimizer"]),
                      backend=saving.backend_for_loading(comp["backend"], backend))
    if cfg["input_dim"] is not None:
        model.build(cfg["input_dim"])
        model.set_weights(saving.load_part_arrays(model._network, 0, files))
        saving.load_part_moments(model._network, 0, files, model.optimizer or O.Adam())
    saving.load_counters(model._network, cfg)
    return model


saving.register(FORMAT, _load)
load_model = saving.load_model
