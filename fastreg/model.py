"""Sequential: the Keras-like model. It decides what to compute; fastreg.kernels computes it.

Fitted state is explicit: ``_W``/``_b`` (parameters), ``_mW``/``_vW``/``_mb``/``_vb``
(optimizer moments), ``_step`` (training steps ever run: the Philox step counter, so masks
never repeat across fits), ``_t`` (optimizer steps since compile: Adam's bias correction),
``_epochs_run`` (seeds the shuffles), ``_mc_step`` (MC-dropout passes drawn by
``predict(mc_samples=...)`` without a seed: their Philox step counter).
"""
import copy
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

from . import augment as augmentation
from . import backend as backends
from . import layers as L
from . import optimizers as O
from . import regularizers as R
from .callbacks import Callback, History
from .kernels import contract as C
from .kernels import driver
from .kernels.philox import dropout_scale, dropout_threshold
from .kernels.reference import activation as _activation
from .kernels.reference import penalty_value
from .progress import EpochProgress
from .validation import as_features, as_targets, check_positive_int

FORMAT = "fastreg-model"
FORMAT_VERSION = 1
PREDICT_BATCH = 4096


class Sequential:
    """A stack of Dense layers (with dropout folded in), trained by fused kernels.

    Sequential(layers, input_dim=None, seed=0, dtype="float32"). The weights are created from
    `seed` when input_dim is known (here, or from X at the first fit/predict).
    """

    def __init__(self, layers=None, input_dim=None, seed=0, dtype="float32"):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.seed = int(seed)
        self.dtype = np.dtype(dtype)
        self.layers = []
        self.input_dim = None
        self._W, self._b = [], []
        self._bn, self._bn_stats = [], []   # per Dense: (2, O) gamma; beta / running mean; var
        for layer in layers or []:
            self.add(layer)
        self._reset_optimizer_state()
        self._step = 0
        self._t = 0
        self._epochs_run = 0
        self._mc_step = 0
        self.loss = None
        self.optimizer = None
        self.backend = None
        self.history = None
        self.stop_training = False
        if input_dim is not None:
            self.build(input_dim)

    # ------------------------------------------------------------ structure
    def add(self, layer):
        if not isinstance(layer, L.Layer):
            raise TypeError(f"Sequential takes fastreg layers (Dense, Dropout, BatchNorm, "
                            f"GaussianNoise, GaussianDropout), got {layer!r}")
        if self.built:
            raise ValueError("layers must be added before the model is built")
        if isinstance(layer, L.NOISE_LAYERS):   # placement errors now, the model untouched
            self._blocks(self.layers + [layer], partial=True)
        if isinstance(layer, L.BatchNorm) and not (self.layers
                                                   and isinstance(self.layers[-1], L.Dense)):
            after = type(self.layers[-1]).__name__ if self.layers else "nothing (first layer)"
            raise ValueError(f"BatchNorm must come right after a Dense: it normalizes that "
                             f"Dense's pre-activation x @ W + b; here it follows {after}")
        self.layers.append(layer)

    @property
    def built(self):
        return bool(self._W)

    def _blocks(self, layers=None, partial=False):
        """Fold the layer list into dense blocks: (Dense, input dropout, output dropout,
        BatchNorm or None, input noise, output noise: a GaussianNoise / GaussianDropout or
        None). partial=True folds a list that may have no Dense yet (add's check)."""
        layers = self.layers if layers is None else layers
        blocks, pending = [], 0.0
        noise = None    # the noise layer since the last Dense (or on the inputs)
        for i, layer in enumerate(layers):
            if isinstance(layer, L.NOISE_LAYERS):
                where = "the inputs" if not blocks else f"the output of Dense {len(blocks) - 1}"
                if noise is not None:
                    raise ValueError(f"at most one GaussianNoise / GaussianDropout per dense "
                                     f"output (or on the inputs): {noise!r} and {layer!r} both "
                                     f"act on {where}")
                if pending and isinstance(layer, L.GaussianNoise):
                    raise ValueError(f"{layer!r} after a Dropout on {where}: the fused order is "
                                     f"activation, noise, dropout; put the Dropout after the "
                                     f"GaussianNoise")
                noise = layer
                continue
            if isinstance(layer, L.BatchNorm):
                if i == 0 or not isinstance(layers[i - 1], L.Dense):
                    raise ValueError("BatchNorm must come right after a Dense: it normalizes "
                                     "that Dense's pre-activation x @ W + b")
                blocks[-1]["bn"] = layer
                continue
            if isinstance(layer, L.Dropout):
                pending = 1.0 - (1.0 - pending) * (1.0 - layer.rate)
                continue
            if isinstance(layer, L.Dense):
                if pending and blocks:
                    prev = blocks[-1]
                    prev["out_drop"] = 1.0 - (1.0 - prev["out_drop"]) * (1.0 - pending)
                    pending = 0.0
                if noise is not None and blocks:
                    blocks[-1]["noise"] = noise
                blocks.append({"dense": layer, "in_drop": pending if not blocks else 0.0,
                               "out_drop": layer.dropout, "bn": None,
                               "in_noise": noise if not blocks else None, "noise": None})
                pending = 0.0
                noise = None
        if not blocks:
            if partial:
                return blocks
            raise ValueError("a Sequential model needs at least one Dense layer")
        if pending:
            last = blocks[-1]
            last["out_drop"] = 1.0 - (1.0 - last["out_drop"]) * (1.0 - pending)
        if noise is not None:
            blocks[-1]["noise"] = noise
        return blocks

    @property
    def n_outputs(self):
        return self._blocks()[-1]["dense"].units

    def build(self, input_dim):
        input_dim = check_positive_int("input_dim", input_dim)
        blocks = self._blocks()
        rng = np.random.default_rng(self.seed)
        Ws, bs, gbs, stats = [], [], [], []
        fan_in = input_dim
        for blk in blocks:
            d = blk["dense"]
            Ws.append(_init_kernel(d.kernel_initializer, fan_in, d.units, rng, self.dtype))
            bs.append(np.zeros(d.units if d.use_bias else 0, self.dtype))
            shape = (2, d.units) if blk["bn"] is not None else (0, 0)
            gbs.append(np.zeros(shape, self.dtype))          # gamma 1, beta 0
            stats.append(np.zeros(shape, self.dtype))        # running mean 0, variance 1
            if blk["bn"] is not None:
                gbs[-1][C.BN_GAMMA] = 1
                stats[-1][C.BN_VAR] = 1
            fan_in = d.units
        self.input_dim = input_dim
        self._W, self._b = Ws, bs
        self._bn, self._bn_stats = gbs, stats
        self._reset_optimizer_state()

    def count_params(self):
        """Parameters of all layers, BatchNorm's running statistics included (as Keras)."""
        return int(sum(W.size + b.size for W, b in zip(self._W, self._b))
                   + sum(g.size + s.size for g, s in zip(self._bn, self._bn_stats)))

    def summary(self):
        """Print the layers, their shapes and parameter counts (as Keras does); returns the
        same text."""
        text = self._summary_text()
        print(text)
        return text

    def _summary_text(self):
        lines = [f"Sequential(input_dim={self.input_dim}, seed={self.seed}, dtype={self.dtype})"]
        fan_in = self.input_dim
        for i, blk in enumerate(self._blocks()):
            d = blk["dense"]
            n = (fan_in * d.units + (d.units if d.use_bias else 0)) if fan_in else "?"
            extra = f", input dropout {blk['in_drop']:.3g}" if blk["in_drop"] else ""
            if blk["in_noise"] is not None:
                extra += f", input noise {blk['in_noise']!r}"
            if blk["noise"] is not None:
                extra += f", output noise {blk['noise']!r} (before the dropout)"
            if blk["bn"] is not None:
                n = n + 4 * d.units if fan_in else n
                extra += (f", batchnorm(momentum={blk['bn'].momentum:g}, "
                          f"eps={blk['bn'].eps:g}) before the activation")
            lines.append(f"  dense_{i}: {fan_in}->{d.units} {d.activation or 'linear'}, "
                         f"dropout {blk['out_drop']:.3g}{extra}, params {n}, "
                         f"regularizer {d.regularizer or None}")
            fan_in = d.units
        lines.append(f"  total params: {self.count_params() if self.built else '?'}")
        return "\n".join(lines)

    def __repr__(self):
        return self._summary_text()

    # ------------------------------------------------------------ compile
    def compile(self, loss="mse", optimizer=None, backend=None):
        """Choose the loss, the optimizer (fresh state) and the backend (numba by default)."""
        if loss not in C.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(C.LOSSES)}")
        optimizer = O.get(optimizer)
        name = backends.name_of(backend)
        backends.resolve(name)  # fail now, with how to get it, not at fit time
        last = self._blocks()[-1]["dense"]
        if loss != "mse" and last.activation is not None:
            raise ValueError(f"{loss} takes logits: make the last Dense linear "
                             f"(activation=None); predict() returns the probabilities")
        if loss == "sparse_categorical_crossentropy" and last.units < 2:
            raise ValueError("sparse_categorical_crossentropy needs a last Dense with one unit "
                             "per class (>= 2 units)")
        self.loss, self.optimizer, self.backend = loss, optimizer, name
        self._t = 0
        self._reset_optimizer_state()

    def _require_compiled(self):
        if self.loss is None:
            raise RuntimeError("call model.compile(loss=..., optimizer=...) before fit/evaluate")

    def _ops(self):
        return backends.resolve(self.backend)

    # ------------------------------------------------------------ state
    def _reset_optimizer_state(self):
        self._mW = self._vW = self._mb = self._vb = None
        self._mbn = self._vbn = None

    def _ensure_optimizer_state(self):
        if self._mW is not None:
            return
        opt = self.optimizer

        def moments(params, needed):
            return [np.zeros_like(p) if needed else np.zeros((0,) * p.ndim, self.dtype)
                    for p in params]
        self._mW, self._mb = moments(self._W, opt.needs_m), moments(self._b, opt.needs_m)
        self._vW, self._vb = moments(self._W, opt.needs_v), moments(self._b, opt.needs_v)
        self._mbn, self._vbn = moments(self._bn, opt.needs_m), moments(self._bn, opt.needs_v)

    def _snapshot(self):
        copy = (lambda xs: None if xs is None else [x.copy() for x in xs])
        return {"W": copy(self._W), "b": copy(self._b), "mW": copy(self._mW),
                "vW": copy(self._vW), "mb": copy(self._mb), "vb": copy(self._vb),
                "bn": copy(self._bn), "bn_stats": copy(self._bn_stats),
                "mbn": copy(self._mbn), "vbn": copy(self._vbn),
                "step": self._step, "t": self._t, "epochs_run": self._epochs_run,
                "input_dim": self.input_dim}

    def _restore(self, snap):
        """Put a snapshot back, in place where the arrays exist (nets keep referencing them)."""
        if snap["W"] and self._W and len(snap["W"]) == len(self._W):
            for dst, src in zip(self._W + self._b + self._bn + self._bn_stats,
                                snap["W"] + snap["b"] + snap["bn"] + snap["bn_stats"]):
                dst[...] = src
        else:
            self._W, self._b = snap["W"] or [], snap["b"] or []
            self._bn, self._bn_stats = snap["bn"] or [], snap["bn_stats"] or []
        if snap["mW"] is None:
            self._reset_optimizer_state()
        elif self._mW is not None:
            for dst, src in zip(self._mW + self._vW + self._mb + self._vb + self._mbn + self._vbn,
                                snap["mW"] + snap["vW"] + snap["mb"] + snap["vb"] + snap["mbn"]
                                + snap["vbn"]):
                dst[...] = src
        else:
            self._mW, self._vW, self._mb, self._vb = (snap["mW"], snap["vW"], snap["mb"],
                                                      snap["vb"])
            self._mbn, self._vbn = snap["mbn"], snap["vbn"]
        self._step, self._t, self._epochs_run = snap["step"], snap["t"], snap["epochs_run"]
        self.input_dim = snap["input_dim"]

    def _make_net(self, batch=None, y_width=1, training=True):
        """The compute-side view of this model (references, not copies, of the parameters)."""
        blocks = self._blocks()
        n = len(blocks)
        li = np.zeros((n, C.LI_SIZE), np.int64)
        lf = np.zeros((n, C.LF_SIZE), self.dtype)
        hpW = np.zeros((n, C.HP_SIZE))
        hpb = np.zeros((n, C.HP_SIZE))
        hpgb = np.zeros((n, C.HP_SIZE))
        opt = self.optimizer or O.Adam()
        lr, b1, b2, eps, nesterov, wd = opt.hyper()
        for i, blk in enumerate(blocks):
            d = blk["dense"]
            li[i, C.LI_ACT] = C.ACTIVATIONS[d.activation]
            li[i, C.LI_DROP_THR] = dropout_threshold(blk["out_drop"])
            li[i, C.LI_HAS_BIAS] = int(d.use_bias)
            li[i, C.LI_IN_DROP_THR] = dropout_threshold(blk["in_drop"])
            lf[i, C.LF_SLOPE] = d.negative_slope
            lf[i, C.LF_DROP_SCALE] = dropout_scale(blk["out_drop"], self.dtype.type)
            lf[i, C.LF_IN_DROP_SCALE] = dropout_scale(blk["in_drop"], self.dtype.type)
            li[i, C.LI_NOISE], lf[i, C.LF_NOISE_STD] = L.noise_code(blk["noise"])
            li[i, C.LI_IN_NOISE], lf[i, C.LF_IN_NOISE_STD] = L.noise_code(blk["in_noise"])
            bn = blk["bn"]
            if bn is not None:
                li[i, C.LI_BN] = int(training)   # inference: folded into W, b below
                lf[i, C.LF_BN_EPS] = bn.eps
                lf[i, C.LF_BN_MOMENTUM] = bn.momentum
            # gamma/beta: never penalized nor decayed (no regularizer, decay 0)
            for row, regs, decay in ((hpW[i], d.regularizer, wd), (hpb[i], d.bias_regularizer, 0.0),
                                     (hpgb[i], [], 0.0)):
                l1, l2, proximal, maxnorm, group = R.combine(regs)
                row[[C.HP_LR, C.HP_BETA1, C.HP_BETA2, C.HP_EPS, C.HP_NESTEROV, C.HP_DECOUPLED,
                     C.HP_L1, C.HP_L2, C.HP_PROXIMAL, C.HP_MAXNORM, C.HP_GROUP]] = \
                    (lr, b1, b2, eps, nesterov, decay, l1, l2, float(proximal), maxnorm, group)
        Ws, bs = list(self._W), list(self._b)
        if training:
            self._ensure_optimizer_state()
            moments = (self._mW, self._vW, self._mb, self._vb)
            grads = ([np.zeros_like(W) for W in self._W], [np.zeros_like(b) for b in self._b])
        else:
            empty = [[] for _ in range(4)]
            moments, grads = empty, ([], [])
            for i, blk in enumerate(blocks):
                if blk["bn"] is not None:
                    Ws[i], bs[i] = self._folded(i, blk["bn"].eps)
        net = driver.Net(Ws, bs, grads[0], grads[1], *moments,
                         li=li, lf=lf, hpW=hpW, hpb=hpb, opt=opt.code,
                         loss=C.LOSSES.get(self.loss, C.LOSS_MSE), seed=self.seed)
        if training:
            net.gbs, net.stats = list(self._bn), list(self._bn_stats)
            net.dgbs = [np.zeros_like(g) for g in self._bn]
            net.mgb, net.vgb = list(self._mbn), list(self._vbn)
            net.hpgb = hpgb
        driver.ensure_bn_lists(net)
        if batch:
            driver.allocate_workspace(net, batch, y_width)
        return net

    def _folded_scale(self, gb, st, eps):
        """s = gamma / sqrt(running_var + eps) in float64; eps rounded to the dtype first,
        as training adds it."""
        eps = float(self.dtype.type(eps))
        return gb[C.BN_GAMMA].astype(np.float64) / np.sqrt(st[C.BN_VAR].astype(np.float64) + eps)

    def _folded_parts(self, gb, st, b, eps):
        """The folded bias b' = (b - running_mean) * s + beta (in the dtype)."""
        s = self._folded_scale(gb, st, eps)
        b64 = b.astype(np.float64) if b.size else 0.0
        return ((b64 - st[C.BN_MEAN].astype(np.float64)) * s
                + gb[C.BN_BETA].astype(np.float64)).astype(self.dtype)

    def _folded(self, i, eps):
        """Dense i with its BatchNorm folded in for inference (running statistics):
        W' = W * s, b' = (b - running_mean) * s + beta, s = gamma / sqrt(running_var + eps),
        in float64, rounded once to the dtype."""
        s = self._folded_scale(self._bn[i], self._bn_stats[i], eps)
        W = np.ascontiguousarray(self._W[i].astype(np.float64) * s, self.dtype)
        return W, self._folded_parts(self._bn[i], self._bn_stats[i], self._b[i], eps)

    # ------------------------------------------------------------ weights
    def _weight_list(self):
        """The live arrays get_weights copies, in Keras' order: per Dense W, b, then for a
        BatchNorm after it gamma, beta, moving mean, moving variance (views of _bn and
        _bn_stats)."""
        out = []
        for W, b, gb, st in zip(self._W, self._b, self._bn, self._bn_stats):
            out += [W, b]
            if gb.size:
                out += [gb[C.BN_GAMMA], gb[C.BN_BETA], st[C.BN_MEAN], st[C.BN_VAR]]
        return out

    def get_weights(self):
        """[W0, b0, W1, b1, ...] (copies), W of shape (fan_in, fan_out). A Dense followed by a
        BatchNorm contributes W, b, gamma, beta, moving_mean, moving_variance (Keras' order)."""
        return [a.copy() for a in self._weight_list()]

    def set_weights(self, weights):
        """Replace the parameters; shapes must match exactly. All-or-nothing."""
        if not self.built:
            raise ValueError("the model is not built yet: pass input_dim to Sequential or "
                             "call fit/build first")
        current = self._weight_list()
        assign_weights(current, weights, self.dtype, [""] * len(current),
                       "[W0, b0, ...], and gamma, beta, moving_mean, moving_variance after the "
                       "W, b of a Dense with BatchNorm")

    def penalty(self):
        """The current regularization term sum over layers (what history['penalty'] tracks)."""
        net = self._make_net(training=False)
        return float(sum(penalty_value(W, net.hpW[i]) + penalty_value(b, net.hpb[i])
                         for i, (W, b) in enumerate(zip(self._W, self._b))))

    # ------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, augment=None, image_shape=None):
        """Train; returns a History. A failed fit leaves the model as it was.

        augment: augmenters (fastreg.augment) applied in order to the training batches, seeded
        by the model (never to validation data); image_shape=(H, W) or (H, W, C) for the image
        augmenters that were not given one."""
        self._require_compiled()
        X = as_features(X, "X", self.input_dim, self.dtype)
        loss_code = C.LOSSES[self.loss]
        Y = as_targets(y, X.shape[0], loss_code, self.n_outputs, "y", self.dtype)
        epochs = check_positive_int("epochs", epochs)
        batch_size = check_positive_int("batch_size", batch_size)
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a tuple (X_val, y_val)")
            Xv = as_features(validation_data[0], "X_val", X.shape[1], self.dtype)
            Yv = as_targets(validation_data[1], Xv.shape[0], loss_code, self.n_outputs,
                            "y_val", self.dtype)
            val = (Xv, Yv)
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastreg Callback instances, got {cb!r}")
        plan = augmentation.prepare(augment, X.shape[1], loss_code, image_shape)
        ops = self._ops()
        snapshot = self._snapshot()
        try:
            if not self.built:
                self.build(X.shape[1])
            return self._fit(ops, X, Y, epochs, batch_size, val, shuffle, callbacks, verbose,
                             plan)
        except BaseException:
            self._restore(snapshot)
            raise

    def _fit(self, ops, X, Y, epochs, batch_size, val, shuffle, callbacks, verbose, plan=()):
        available = {"loss", "penalty"} | ({"val_loss"} if val else set())
        history, cbs = begin_training(self, callbacks, available)
        n = X.shape[0]
        batch = min(batch_size, n)
        net = self._make_net(batch, augmentation.target_width(plan, Y.shape[1]))
        sync = getattr(ops, "sync_to_host", None)
        n_batches = -(-n // batch_size)
        progress = EpochProgress(epochs, n_batches, verbose)
        try:
            for epoch in range(epochs):
                perm = epoch_order(self, n, shuffle)
                Xe, Ye = X, Y
                if plan:
                    # The epoch's rows in training order, augmented as its batches (fresh
                    # arrays each epoch: the CUDA backend re-uploads a new array, not a reused
                    # one); the compiled loops then walk them in order.
                    Xe, Ye = augmentation.augment_epoch(plan, X, Y, perm, batch_size,
                                                        self.seed, self._step)
                    perm = np.arange(n, dtype=np.int64)
                start_state = self._snapshot()
                loss_sum = pen_sum = 0.0
                steps_done = 0
                finite = True
                for first, last in progress.chunks(epoch):
                    ls, ps, steps, finite = ops.train_epoch(
                        net, Xe, Ye, perm[first * batch_size:last * batch_size], batch_size,
                        self._step, self._t + 1)
                    loss_sum += ls
                    pen_sum += ps
                    steps_done += steps
                    self._step += steps
                    self._t += steps
                    rows = min(n, (first + steps) * batch_size) if steps else 1
                    progress.update(epoch, first + steps, loss_sum / max(rows, 1))
                    if not finite:
                        break
                if sync is not None:
                    sync(net)
                if not finite:
                    self._stop_on_nonfinite(epoch, steps_done, start_state)
                    break
                logs = {"loss": loss_sum / n, "penalty": pen_sum / n}
                if val is not None:
                    logs["val_loss"] = self._data_loss(ops, *val)
                if end_epoch(self, progress, cbs, epoch, logs):
                    break
        finally:
            progress.close()
        return end_training(self, history, cbs, progress)

    def _stop_on_nonfinite(self, epoch, steps_done, start_state):
        stop_on_nonfinite(self, self._W + self._b + self._bn + self._bn_stats, epoch,
                          steps_done, start_state, "Lower the learning rate or check the data "
                          "scale.")

    # ------------------------------------------------------------ inference
    def _logits(self, ops, X, batch_size=None):
        net = self._make_net(training=False)
        return ops.forward_inference(net, X, batch_size or PREDICT_BATCH)

    def _data_loss(self, ops, X, Y):
        logits = self._logits(ops, X)
        return float(ops.loss_value(logits, Y, C.LOSSES[self.loss]))

    def predict(self, X, batch_size=None, mc_samples=None, seed=None):
        """Outputs for X, dropout off: probabilities for the cross-entropy losses.

        mc_samples=n (an int >= 1): MC dropout (Gal & Ghahramani, 2016). Returns (mean, std)
        over n dropout masks per row, dropout on as in training (input dropout included), each
        of shape (rows, outputs); for the cross-entropies both are over probabilities; std is
        the population std (ddof=0), exactly 0 for a model without dropout. The n samples of a
        row run in one batched forward pass (kernels/driver.mc_dropout_forward, whose rows per
        pass depend on n only: batch_size does not apply). The masks come from the Philox
        streams of training, told apart by the layer word (philox.MC_LAYER_TAG):
        seed=s makes the result a pure function of (weights, X, n, s), the same on every
        backend up to float32 rounding; seed=None uses the model's seed and advances the
        model's MC pass counter, so successive calls draw fresh masks, reproducibly from the
        model's seed (the counter is saved with the model).
        """
        mc_samples, seed = check_mc_arguments(mc_samples, seed)
        X = as_features(X, "X", self.input_dim, self.dtype)
        if batch_size is not None:
            batch_size = check_positive_int("batch_size", batch_size)
        if not self.built:
            self.build(X.shape[1])
        ops = self._ops() if self.backend else backends.resolve(None)
        if mc_samples is not None:
            return self._predict_mc(ops, X, mc_samples, seed)
        logits = self._logits(ops, X, batch_size)
        return ops.output_transform(logits, C.LOSSES[self.loss]) if self.loss else logits

    def _predict_mc(self, ops, X, n_samples, seed):
        net = self._make_net(training=False)
        loss = C.LOSSES[self.loss] if self.loss else C.LOSS_MSE   # LOSS_MSE: outputs as they are
        key, step0 = (self.seed, self._mc_step) if seed is None else (int(seed), 0)
        mean, std, passes = driver.mc_dropout_forward(ops, net, X, n_samples, key, step0, loss)
        if seed is None:
            self._mc_step = (self._mc_step + passes) % 2 ** 32
        return mean, std

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
        Y = as_targets(y, X.shape[0], C.LOSSES[self.loss], self.n_outputs, "y", self.dtype)
        ops = self._ops()
        logits = self._logits(ops, X, batch_size)
        return float(ops.loss_value(logits, Y, C.LOSSES[self.loss]))

    # ------------------------------------------------------------ pruning
    def prune(self):
        """Remove dead hidden units physically; returns a PruneReport.

        A hidden unit j of dense layer l is dead when its incoming column W_l[:, j] is all
        exactly zero (what L1's proximal step leaves): its output is then the constant
        f(b_j) (f(0) without a bias; dropout is off at inference), whose contribution
        f(b_j) * W_{l+1}[j, :] is folded into the next layer's bias, so predictions are
        unchanged up to float32 rounding. When the next layer has no bias, only units with a
        zero contribution are removed. Layers are visited in order, so a unit whose inputs all
        came from removed units is found too. The output layer, the inputs and the last unit
        of a layer are never removed. W, b of the layer, the rows of the next W and the Adam /
        momentum moments of all of them shrink together: fit() continues without a new
        compile (Adam's step count is kept). The Dense layers of the model are replaced by
        copies with the new widths, so save/load_model and summary() see them.
        Units with nonzero inputs but a zero outgoing row are not removed.

        BatchNorm: a dead unit of a Dense with BatchNorm outputs, at inference, the constant
        f(gamma_j * (b_j - running_mean_j) / sqrt(running_var_j + eps) + beta_j) (its folded
        bias; during training its output is f(beta_j)); its gamma, beta and running
        statistics are removed with it. When the NEXT Dense has a BatchNorm, the
        contribution is folded into that layer's running mean (subtracted) instead of its
        bias, so even a next layer without bias can take it; its batch statistics absorb the
        constant in training.
        """
        if not self.built:
            raise ValueError("the model has no weights yet: fit it or pass input_dim")
        state = PruneState(self)
        for l in range(len(state.Ws) - 1):
            state.prune_layer(l, [(state, l + 1)])
        return state.commit()

    # ------------------------------------------------------------ persistence
    def get_config(self):
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "layers": [layer.get_config() for layer in self.layers],
                "input_dim": self.input_dim, "seed": self.seed, "dtype": self.dtype.name,
                "compile": None if self.loss is None else {
                    "loss": self.loss, "optimizer": self.optimizer.get_config(),
                    "backend": self.backend},
                "step": self._step, "t": self._t, "epochs_run": self._epochs_run,
                "mc_step": self._mc_step}

    def save(self, path):
        """Write the model (config as JSON, arrays as .npy members) to `path` atomically."""
        arrays = {"config": np.array(json.dumps(self.get_config()))}
        arrays.update(_model_arrays(self))
        _write_npz(path, arrays)

    # ------------------------------------------------------------ export (fastreg.export)
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


def _model_arrays(model):
    """A built (or unbuilt) Sequential's .npy members besides the config: its parameters and
    optimizer moments, as save() writes them and _load_model_arrays reads them back
    (fastreg.multitask stores each part of a MultiTask with these, under a prefix)."""
    arrays = {}
    for i, (W, b) in enumerate(zip(model._W, model._b)):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    for i, (gb, st) in enumerate(zip(model._bn, model._bn_stats)):
        if gb.size:     # BatchNorm: (2, O) gamma; beta and running mean; variance
            arrays[f"bn{i}"], arrays[f"bnstat{i}"] = gb, st
    if model._mW is not None:
        for name, xs in (("mW", model._mW), ("vW", model._vW), ("mb", model._mb),
                         ("vb", model._vb)):
            for i, x in enumerate(xs):
                arrays[f"{name}{i}"] = x
        for name, xs in (("mbn", model._mbn), ("vbn", model._vbn)):
            for i, x in enumerate(xs):
                if model._bn[i].size:
                    arrays[f"{name}{i}"] = x
    return arrays


def _write_npz(path, arrays):
    """Write {name: array} as an .npz at `path` atomically (a temporary file, then rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastreg-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_model_file(path):
    """(config, {member: array}) of a file written by save(), read without pickle."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {k: data[k] for k in data.files}
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable fastreg model file (corrupt or not an "
                         f".npz archive): {exc}") from exc
    try:
        cfg = json.loads(str(files["config"]))
        if not isinstance(cfg, dict):
            raise ValueError("its config is not a JSON object")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a valid fastreg model file: {exc}") from exc
    return cfg, files


def _backend_for_loading(saved, backend=None):
    """`backend` if given, else the saved backend when it is available here, else None (the
    default backend: e.g. a model trained on a GPU, loaded on a laptop)."""
    if backend is not None:
        return backend
    try:
        backends.resolve(saved)
    except (backends.BackendUnavailable, ValueError):
        return None
    return saved


def load_model(path, backend=None):
    """Load a model written by Sequential.save or MultiTask.save, without pickle.

    The saved backend is used when it is available here, else `backend` or the default.
    """
    cfg, files = _read_model_file(path)
    path = os.fspath(path)
    try:
        from . import multitask   # here: multitask imports this module
        if cfg.get("format") == multitask.FORMAT:
            return multitask._from_config(cfg, files, backend)
        if cfg.get("format") != FORMAT:
            raise ValueError("not a fastreg model")
        if cfg.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"written by a newer fastreg (format {cfg['version']})")
        model = Sequential([L.from_config(c) for c in cfg["layers"]], seed=cfg["seed"],
                           dtype=cfg["dtype"])
        if cfg["compile"] is not None:
            comp = cfg["compile"]
            model.compile(loss=comp["loss"], optimizer=O.get(comp["optimizer"]),
                          backend=_backend_for_loading(comp["backend"], backend))
        if cfg["input_dim"] is not None:
            model.build(cfg["input_dim"])
            _load_model_arrays(model, files)
        model._step, model._t, model._epochs_run = cfg["step"], cfg["t"], cfg["epochs_run"]
        model._mc_step = int(cfg.get("mc_step", 0))   # absent in files of earlier versions
        return model
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} is not a valid fastreg model file: {exc}") from exc


def _load_model_arrays(model, files):
    """Put the members written by _model_arrays back into a built Sequential (shapes checked:
    ValueError, or KeyError for a missing member)."""
    n = len(model._W)
    weights = []
    for i in range(n):
        weights += [files[f"W{i}"], files[f"b{i}"]]
        if model._bn[i].size:   # gamma, beta, moving mean, moving variance
            gb, st = files[f"bn{i}"], files[f"bnstat{i}"]
            if gb.shape != model._bn[i].shape or st.shape != model._bn[i].shape:
                raise ValueError(f"BatchNorm arrays of layer {i} have shapes "
                                 f"{gb.shape}, {st.shape}, expected "
                                 f"{model._bn[i].shape}")
            weights += [gb[C.BN_GAMMA], gb[C.BN_BETA], st[C.BN_MEAN], st[C.BN_VAR]]
    model.set_weights(weights)
    if "mW0" in files:
        model._ensure_optimizer_state()
        for name in ("mW", "vW", "mb", "vb", "mbn", "vbn"):
            dst = getattr(model, f"_{name}")
            for i in range(n):
                if name in ("mbn", "vbn") and not model._bn[i].size:
                    continue
                src = files[f"{name}{i}"]
                if src.shape != dst[i].shape:
                    raise ValueError(f"optimizer state {name}{i} has shape {src.shape}, "
                                     f"expected {dst[i].shape}")
                dst[i][...] = src


# ---------------------------------------------------------------- the epoch loop's frame
# Shared by Sequential._fit and MultiTask._fit: callbacks, the seeded order, the epoch's end.
def begin_training(model, callbacks, available):
    """History first, then the user's callbacks, each bound to the model and told which
    metrics the fit reports; returns (history, callbacks)."""
    history = History()
    cbs = [history] + list(callbacks)
    for cb in cbs:
        cb.set_model(model)
    for cb in cbs:
        cb.on_train_begin({"available_metrics": available})
    model.stop_training = False
    return history, cbs


def epoch_order(model, n, shuffle):
    """The rows of the next epoch in training order: seeded by (seed, epochs run)."""
    return (np.random.default_rng([model.seed, model._epochs_run]).permutation(n)
            if shuffle else np.arange(n)).astype(np.int64)


def end_epoch(model, progress, cbs, epoch, logs):
    """Count the epoch, show it, tell the callbacks; True when one asked to stop."""
    model._epochs_run += 1
    progress.end_epoch(epoch, logs)
    for cb in cbs:
        cb.on_epoch_end(epoch, logs)
    return model.stop_training


def end_training(model, history, cbs, progress):
    """Tell the callbacks, show what they report (unless they said it themselves), keep the
    history on the model."""
    for cb in cbs:
        cb.on_train_end({})
    for cb in cbs:
        if cb.report and not getattr(cb, "verbose", 0):
            progress.note(cb.report)
    model.history = history
    return history


def stop_on_nonfinite(model, params, epoch, steps_done, start_state, advice, stacklevel=5):
    """After a non-finite batch loss: keep the last finite weights (the failing batch's update
    was skipped), or restore the epoch's starting weights if any parameter is not finite;
    then warn with the epoch and step (Keras' TerminateOnNaN, as a RuntimeWarning), pointed at
    the user's fit call (stacklevel: here <- _stop_on_nonfinite <- _fit <- fit <- caller)."""
    where = "the last finite weights kept"
    if not all(np.isfinite(p).all() for p in params):
        model._restore(start_state)
        where = "the weights restored to the start of that epoch"
    warnings.warn(f"the training loss became NaN or inf at epoch {epoch + 1} (step "
                  f"{steps_done + 1} of the epoch); training stopped with {where}. {advice}",
                  RuntimeWarning, stacklevel=stacklevel)


@dataclass(frozen=True)
class PruneReport:
    """What Sequential.prune() removed. Lists have one entry per Dense layer, in order.

    removed: units removed (0 for the output layer); units_before / units_after: widths;
    params_before / params_after: count_params(); kept: the indices (in the layer before
    pruning) of the units kept, e.g. to map a unit of the pruned model back."""
    removed: list
    units_before: list
    units_after: list
    params_before: int
    params_after: int
    kept: list

    @property
    def total_removed(self):
        return int(sum(self.removed))

    def __str__(self):
        widths = ", ".join(f"{a}->{b}" for a, b in zip(self.units_before, self.units_after))
        return (f"pruned {self.total_removed} units (widths {widths}); params "
                f"{self.params_before} -> {self.params_after}")


class PruneState:
    """A Sequential being pruned (Sequential.prune; fastreg.multitask prunes its trunk and
    heads with one each): new lists of its arrays, replaced (never written in place) as units
    go, installed all at once by commit(). prune_layer(l, consumers) removes the dead units of
    dense layer l and folds their constant outputs into the dense layers that read them:
    consumers = [(state, j), ...], dense layer j of a state (this one, or another model's)."""

    def __init__(self, model):
        self.model = model
        self.blocks = model._blocks()
        self.Ws, self.bs = list(model._W), list(model._b)
        self.gbs, self.stats = list(model._bn), list(model._bn_stats)
        self.moments = {name: (None if getattr(model, f"_{name}") is None
                               else list(getattr(model, f"_{name}")))
                        for name in ("mW", "vW", "mb", "vb", "mbn", "vbn")}
        self.units_before = [W.shape[1] for W in self.Ws]
        self.params_before = model.count_params()
        self.kept = [np.arange(u) for u in self.units_before]
        self.changed = False

    @staticmethod
    def _take(arrays, l, keep, axis, like):
        if arrays is not None and like.size and arrays[l].shape == like.shape:
            arrays[l] = np.ascontiguousarray(np.take(arrays[l], keep, axis=axis))

    def _fold(self, j, delta):
        """Add delta (float64, per unit) to dense layer j's pre-activation constant: into its
        running mean (subtracted) when it has a BatchNorm, else into its bias."""
        dtype = self.Ws[j].dtype
        if self.blocks[j]["bn"] is not None:
            st = self.stats[j].astype(np.float64)
            st[C.BN_MEAN] -= delta
            self.stats[j] = st.astype(dtype)
        elif self.bs[j].size:
            self.bs[j] = (self.bs[j].astype(np.float64) + delta).astype(dtype)

    def prune_layer(self, l, consumers):
        W, b = self.Ws[l], self.bs[l]
        dead = ~W.any(axis=0)
        if not dead.any():
            return
        blk = self.blocks[l]
        d = blk["dense"]
        if blk["bn"] is not None:     # the unit's inference constant: folded bias
            z = self.model._folded_parts(self.gbs[l], self.stats[l], b, blk["bn"].eps)[dead]
        else:
            z = b[dead] if b.size else np.zeros(int(dead.sum()), W.dtype)
        const = _activation(z, C.ACTIVATIONS[d.activation], d.negative_slope)
        contribs = [const.astype(np.float64)[:, None] * s.Ws[j][dead].astype(np.float64)
                    for s, j in consumers]
        removable = np.ones(int(dead.sum()), bool)
        for (s, j), contrib in zip(consumers, contribs):
            if s.bs[j].size == 0 and s.blocks[j]["bn"] is None:   # nowhere to fold:
                removable &= ~(contrib != 0).any(axis=1)          # zero contributions go
        idx = np.flatnonzero(dead)
        dead[idx[~removable]] = False
        contribs = [c[removable] for c in contribs]
        if dead.all():
            dead[np.flatnonzero(dead)[0]] = False   # a Dense keeps at least one unit
            contribs = [c[1:] for c in contribs]
        if not dead.any():
            return
        keep = np.flatnonzero(~dead)
        for (s, j), contrib in zip(consumers, contribs):
            s._fold(j, contrib.sum(axis=0))
            W_next = s.Ws[j]
            for arrays in (s.moments["mW"], s.moments["vW"]):
                self._take(arrays, j, keep, 0, W_next)
            s.Ws[j] = np.ascontiguousarray(W_next[keep])
            s.changed = True
        m, gb = self.moments, self.gbs[l]
        for arrays, axis, like in ((self.Ws, 1, W), (self.bs, 0, b), (m["mW"], 1, W),
                                   (m["vW"], 1, W), (m["mb"], 0, b), (m["vb"], 0, b),
                                   (self.gbs, 1, gb), (self.stats, 1, gb), (m["mbn"], 1, gb),
                                   (m["vbn"], 1, gb)):
            self._take(arrays, l, keep, axis, like)
        self.kept[l] = self.kept[l][keep]
        self.changed = True

    def commit(self):
        """Install the pruned arrays and moments, and copies of the Dense layers with their
        new widths, in the model; returns its PruneReport."""
        model = self.model
        units_after = [W.shape[1] for W in self.Ws]
        if self.changed:
            layers, l = [], 0
            for layer in model.layers:
                if isinstance(layer, L.Dense):
                    if layer.units != units_after[l]:
                        layer = copy.copy(layer)
                        layer.units = units_after[l]
                    l += 1
                layers.append(layer)
            model.layers = layers
            model.input_dim = int(self.Ws[0].shape[0])   # a MultiTask head: the pruned trunk
            model._W, model._b = self.Ws, self.bs
            model._bn, model._bn_stats = self.gbs, self.stats
            m = self.moments
            if m["mW"] is not None:
                model._mW, model._vW, model._mb, model._vb = m["mW"], m["vW"], m["mb"], m["vb"]
                model._mbn, model._vbn = m["mbn"], m["vbn"]
        return PruneReport(removed=[a - b for a, b in zip(self.units_before, units_after)],
                           units_before=self.units_before, units_after=units_after,
                           params_before=self.params_before,
                           params_after=model.count_params(), kept=self.kept)


def assign_weights(current, weights, dtype, labels, layout):
    """set_weights of Sequential and MultiTask: validate every new array against the live
    arrays `current` (count, shapes, finite numbers), then copy them all in, or raise and
    change nothing. labels[i] follows "weight i" in the messages; layout says what the
    expected list holds."""
    weights = list(weights)
    if len(weights) != len(current):
        raise ValueError(f"set_weights expects {len(current)} arrays ({layout}), got "
                         f"{len(weights)}")
    converted = []
    for i, (new, cur) in enumerate(zip(weights, current)):
        arr = np.asarray(new)
        if arr.shape != cur.shape:
            raise ValueError(f"weight {i}{labels[i]} has shape {arr.shape}, expected "
                             f"{cur.shape}")
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise ValueError(f"weight {i}{labels[i]} must be finite numbers")
        converted.append(arr.astype(dtype))
    for cur, new in zip(current, converted):
        cur[...] = new


def _check_mc_samples(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"mc_samples must be an integer >= 1 (dropout masks per row), "
                         f"got {n!r}")
    return int(n)


def check_mc_arguments(mc_samples, seed):
    """predict's (mc_samples, seed), validated (Sequential and MultiTask)."""
    if mc_samples is not None:
        mc_samples = _check_mc_samples(mc_samples)
    if seed is not None:
        if mc_samples is None:
            raise ValueError("seed only applies to MC dropout: pass mc_samples too")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        seed = int(seed)
    return mc_samples, seed


def _init_kernel(kind, fan_in, fan_out, rng, dtype):
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
    else:  # lecun_normal
        W = rng.normal(0.0, math.sqrt(1.0 / fan_in), (fan_in, fan_out))
    return np.ascontiguousarray(W, dtype=dtype)
