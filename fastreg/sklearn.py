"""scikit-learn estimators around fastreg: FastregRegressor and FastregClassifier.

    from fastreg.sklearn import FastregClassifier
    clf = FastregClassifier(hidden_layer_sizes=(64, 64), dropout=0.1, l2=1e-4, epochs=100,
                            early_stopping=True, random_state=0)
    clf.fit(X, y)                      # y: any labels (strings, ints, ...); X: array or DataFrame
    clf.predict_proba(X_test), clf.score(X_test, y_test)
    clf.model_                         # the fitted fr.Sequential (export, prune, save, ...)

The estimator contract (scikit-learn's "developing estimators" guide): ``__init__`` only stores
its arguments; they are validated in ``fit``; fitted state ends with an underscore
(``model_``, ``classes_``, ``n_features_in_``, ``feature_names_in_``, ``history_``,
``n_iter_``); input is checked with scikit-learn's own ``validate_data``, labels encoded with
``LabelEncoder``. Both pass ``sklearn.utils.estimator_checks.check_estimator``.

Conventions, following MLPRegressor / MLPClassifier where fastreg has the same thing:
- The network: one ``Dense(units, activation, dropout=dropout)`` per entry of
  ``hidden_layer_sizes`` (with ``batch_norm=True`` a ``BatchNorm()`` after each), then a linear
  output Dense. ``l1`` / ``l2`` penalize every kernel (both: ``ElasticNet``), with fastreg's
  conventions (L2 adds l2/2 * sum W^2, L1 is proximal). Loss: mse (regressor), one sigmoid
  output with binary_crossentropy for two classes, softmax with
  sparse_categorical_crossentropy for more.
- ``dtype=None`` computes in the input's float dtype, as MLP does: float32 data trains the
  float32 kernels, anything else float64; pass ``dtype="float32"`` for fastreg's fast path on
  float64 data.
- ``batch_size="auto"`` is min(200, n_samples); ``epochs`` passes over the data per ``fit``.
- ``early_stopping=True`` holds out ``validation_fraction`` of the rows (stratified for the
  classifier, seeded by ``random_state``), stops after ``patience`` epochs without a
  ``val_loss`` improvement larger than ``min_delta`` and restores the best weights.
- ``warm_start=True``: the next ``fit`` starts from the fitted weights with a fresh optimizer
  at the current hyperparameters (MLP's semantics; a changed ``l2`` or ``dropout`` applies,
  a changed ``hidden_layer_sizes`` is an error). ``partial_fit`` runs one epoch on the data
  it is given and keeps the optimizer state between calls (no early stopping).
- ``random_state``: an int is the model seed itself (the same weights, dropout masks and
  shuffles as ``fr.Sequential(seed=random_state)``); None or a RandomState draws one.
- ``n_iter_`` counts the epochs run since the last cold start; ``history_`` holds their
  ``loss`` / ``penalty`` / ``val_loss`` lists.
- Pickling stores ``model_`` with fastreg's own ``save`` format (no pickle of its
  internals), so a pickled estimator reloads in a fastreg whose internals changed.

``fit`` and ``partial_fit`` take ``sample_weight`` (one number >= 0 per row, scikit-learn's
checks), scaled to mean 1 and forwarded to ``fr.Sequential.fit`` (a batch's loss
sum_r w_r l_r / B): over a whole batch that is scikit-learn's weighted average, so integer
weights equal repeated rows. It is split with the rows of the early-stopping hold-out,
whose validation loss it weighs too.
"""
import numbers
import os
import tempfile

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError("fastreg.sklearn needs scikit-learn >= 1.6: pip install "
                      "\"fastreg[sklearn]\"") from exc

from . import backend as backends
from .layers import BatchNorm, Dense
from . import optimizers
from . import regularizers
from .callbacks import EarlyStopping
from .model import Sequential
from .saving import load_model

ACTIVATION_ALIASES = {"identity": None, "linear": None, "logistic": "sigmoid",
                      "relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh",
                      "sigmoid": "sigmoid"}
OPTIMIZERS = {"adam": optimizers.Adam, "adamw": optimizers.AdamW, "sgd": optimizers.SGD}
# Parameters that define the layers: a warm start with any of them changed rebuilds the
# model from the fitted weights; otherwise it keeps the model (and its Philox step counter).
LAYER_PARAMS = ("hidden_layer_sizes", "activation", "dropout", "l1", "l2", "batch_norm",
                "dtype")
INPUT_ATTRIBUTES = ("n_features_in_", "feature_names_in_")   # set by validate_data


class _FastregEstimator(BaseEstimator):
    """What the regressor and the classifier share: the parameters, the network, the fit."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", dropout=0.0, l1=0.0,
                 l2=0.0, batch_norm=False, optimizer="adam", learning_rate=1e-3,
                 batch_size="auto", epochs=200, shuffle=True, early_stopping=False,
                 validation_fraction=0.1, patience=10, min_delta=0.0, backend=None,
                 dtype=None, random_state=None, warm_start=False, verbose=0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.dropout = dropout
        self.l1 = l1
        self.l2 = l2
        self.batch_norm = batch_norm
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.min_delta = min_delta
        self.backend = backend
        self.dtype = dtype
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    # ------------------------------------------------------------ parameters
    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = (sizes,)
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise ValueError(f"hidden_layer_sizes must be a tuple of positive integers, got "
                             f"{self.hidden_layer_sizes!r}") from None
        if any(isinstance(u, bool) or not isinstance(u, numbers.Integral) or u < 1
               for u in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got "
                             f"{self.hidden_layer_sizes!r}")
        return tuple(int(u) for u in sizes)

    def _activation(self):
        if self.activation not in ACTIVATION_ALIASES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_ALIASES)}, got "
                             f"{self.activation!r}")
        return ACTIVATION_ALIASES[self.activation]

    def _regularizer(self):
        strengths = []
        for name in ("l1", "l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            strengths.append(float(value))
        l1, l2 = strengths
        if l1 and l2:
            return regularizers.ElasticNet(l1=l1, l2=l2)
        if l1:
            return regularizers.L1(l1)
        if l2:
            return regularizers.L2(l2)
        return None      # (a negative strength is nonzero: fastreg's constructors refuse it)

    def _make_optimizer(self):
        name = self.optimizer
        if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise ValueError(f"learning_rate must be a number > 0, got {lr!r}")
        return OPTIMIZERS[name.lower()](float(lr))

    def _check_training_params(self):
        for name in ("epochs", "patience"):
            value = getattr(self, name)
            low = 1 if name == "epochs" else 0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        bs = self.batch_size
        if not (bs == "auto" or (isinstance(bs, numbers.Integral) and not isinstance(bs, bool)
                                 and bs >= 1)):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got {bs!r}")
        vf = self.validation_fraction
        if self.early_stopping and (isinstance(vf, bool) or not isinstance(vf, numbers.Real)
                                    or not 0 < vf < 1):
            raise ValueError(f"validation_fraction must be in (0, 1) with early_stopping, got "
                             f"{vf!r}")
        if self.dtype not in (None, "float32", "float64", np.float32, np.float64):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {self.verbose!r}")

    def _seed(self):
        """The model seed: an int random_state is the seed itself, else one is drawn."""
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool) and 0 <= rs < 2 ** 63:
            return int(rs)
        return int(check_random_state(rs).randint(np.iinfo(np.int32).max))

    def _layer_params(self):
        return {k: getattr(self, k) for k in LAYER_PARAMS}

    def _layers(self, n_outputs):
        """The fastreg layers of the network (their constructors check the values)."""
        activation, reg = self._activation(), self._regularizer()
        layers = []
        for units in self._hidden_sizes():
            layers.append(Dense(units, activation, dropout=self.dropout, regularizer=reg))
            if self.batch_norm:
                layers.append(BatchNorm())
        layers.append(Dense(n_outputs, regularizer=reg))
        return layers

    def _new_model(self, n_features, n_outputs, dtype, seed):
        return Sequential(self._layers(n_outputs), input_dim=n_features, seed=seed,
                          dtype=dtype)

    # ------------------------------------------------------------ fitting
    def _work_dtype(self, X):
        if self.dtype is not None:
            return np.dtype(self.dtype)
        return np.dtype(np.float32) if X.dtype == np.float32 else np.dtype(np.float64)

    def _fit(self, X, y, incremental, classes=None, **row_params):
        """fit (incremental=False) and partial_fit (True). row_params: per-row arrays for
        model.fit (sample_weight), split with the early-stopping hold-out. The parameters
        are checked before the data; the fitted attributes are set only once the fit
        succeeded."""
        self._check_training_params()
        self._layers(1)
        optimizer = self._make_optimizer()
        backends.resolve(self.backend)    # an unknown or missing backend: before the data
        row_params = {k: v for k, v in row_params.items() if v is not None}
        saved = {k: self.__dict__[k] for k in INPUT_ATTRIBUTES if k in self.__dict__}
        try:
            return self._fit_data(X, y, incremental, classes, optimizer, row_params)
        except BaseException:
            # validate_data recorded the new X's width and names: a failed fit takes them back
            for k in INPUT_ATTRIBUTES:
                self.__dict__.pop(k, None)
            self.__dict__.update(saved)
            raise

    def _fit_data(self, X, y, incremental, classes, optimizer, row_params):
        cold = not hasattr(self, "model_") or not (incremental or self.warm_start)
        X, y = validate_data(self, X, y, reset=cold, dtype=[np.float64, np.float32],
                             **self._target_check())
        if row_params.get("sample_weight") is not None:
            row_params["sample_weight"] = _check_sample_weight(row_params["sample_weight"], X,
                                                               ensure_non_negative=True)
        targets, fitted = self._encode_targets(y, cold, classes)
        n_outputs, loss = self._output_spec(fitted)
        dtype = self._work_dtype(X)
        seed = self._seed() if cold else self.model_.seed
        # partial_fit continues the model as it is built: its layers stay what they were
        layer_params = (self._fitted_layer_params if incremental and not cold
                        else self._layer_params())
        if cold:
            model = self._new_model(X.shape[1], n_outputs, dtype, seed)
            model.compile(loss=loss, optimizer=optimizer, backend=self.backend)
            history = {}
        else:
            model = self.model_
            if not incremental:   # warm_start: a fresh optimizer at the current parameters
                if layer_params != self._fitted_layer_params:
                    model = self._carry_weights(model, X.shape[1], n_outputs, dtype, seed)
                model.compile(loss=loss, optimizer=optimizer, backend=self.backend)
            history = {k: list(v) for k, v in self.history_.items()}
        fit_kwargs = {"epochs": 1 if incremental else self.epochs,
                      "batch_size": (min(200, X.shape[0]) if self.batch_size == "auto"
                                     else int(self.batch_size)),
                      "shuffle": bool(self.shuffle), "verbose": self.verbose}
        if self.early_stopping and not incremental:
            X, targets, fit_kwargs["validation_data"], row_params = self._hold_out(
                X, targets, seed, row_params)
            fit_kwargs["callbacks"] = [EarlyStopping("val_loss", patience=int(self.patience),
                                                     min_delta=float(self.min_delta),
                                                     restore_best_weights=True)]
        if "sample_weight" in row_params:
            row_params["sample_weight"] = _mean_one(row_params["sample_weight"])
            val = fit_kwargs.get("validation_data")
            if val is not None and len(val) == 3:
                fit_kwargs["validation_data"] = val[:2] + (_mean_one(val[2]),)
        run = model.fit(X, targets, **fit_kwargs, **row_params)
        for key, values in run.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        for name, value in fitted.items():
            setattr(self, name, value)
        self._fitted_layer_params = layer_params
        self.model_ = model
        self.history_ = history
        self.n_iter_ = len(history.get("loss", []))
        return self

    def _carry_weights(self, model, n_features, n_outputs, dtype, seed):
        """warm_start after a layer parameter changed (l2, dropout, ...): a new model of the
        current parameters holding the fitted weights."""
        fresh = self._new_model(n_features, n_outputs, dtype, seed)
        try:
            fresh.set_weights(model.get_weights())
        except ValueError as exc:
            raise ValueError(f"warm_start=True continues from the fitted weights, which do not "
                             f"fit the new hidden_layer_sizes / batch_norm ({exc}); set "
                             f"warm_start=False to fit from scratch") from None
        return fresh

    def _hold_out(self, X, targets, seed, row_params):
        stratify = targets.ravel() if self._stratify else None
        names = list(row_params)
        try:
            parts = train_test_split(X, targets, *[row_params[k] for k in names],
                                     test_size=float(self.validation_fraction),
                                     random_state=seed % 2 ** 32, stratify=stratify)
        except ValueError as exc:
            raise ValueError(f"early_stopping could not hold out validation_fraction="
                             f"{self.validation_fraction} of {X.shape[0]} rows: {exc}") \
                from None
        X_tr, X_val, t_tr, t_val = parts[:4]
        rows = {k: parts[4 + 2 * i] for i, k in enumerate(names)}
        held = {k: parts[5 + 2 * i] for i, k in enumerate(names)}
        val = ((X_val, t_val, held["sample_weight"]) if "sample_weight" in held
               else (X_val, t_val))     # the held-out rows' loss weighted as the training one
        return X_tr, t_tr, val, rows

    def _predict_raw(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.model_.predict(X)

    # ------------------------------------------------------------ persistence
    def __getstate__(self):
        state = super().__getstate__()
        if "model_" in state:
            state = dict(state, model_=_model_to_bytes(state["model_"]))
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            state = dict(state, model_=_model_from_bytes(state["model_"]))
        super().__setstate__(state)


class FastregRegressor(RegressorMixin, _FastregEstimator):
    """A fastreg MLP as a scikit-learn regressor (mse; y of shape (n,) or (n, outputs)).

    Parameters are described in the module docstring (fastreg.sklearn). Fitted attributes:
    model_ (fr.Sequential), n_features_in_, feature_names_in_ (DataFrame input), n_outputs_,
    history_, n_iter_."""

    _stratify = False

    def _target_check(self):
        return {"multi_output": True, "y_numeric": True}

    def _encode_targets(self, y, cold, classes):
        """(targets for model.fit, the fitted attributes they define)."""
        if classes is not None:
            raise ValueError("classes only applies to FastregClassifier.partial_fit")
        y = np.asarray(y)
        outputs = 1 if y.ndim == 1 else y.shape[1]
        if not cold and outputs != self.n_outputs_:
            raise ValueError(f"y has {outputs} output(s) but the fitted model has "
                             f"{self.n_outputs_}")
        return (y.reshape(-1, 1) if y.ndim == 1 else y), {"n_outputs_": outputs}

    def _output_spec(self, fitted):
        return fitted["n_outputs_"], "mse"

    def fit(self, X, y, sample_weight=None):
        """Train on X (n, features) and y (n,) or (n, outputs), rows weighted by
        sample_weight; returns self."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch on (X, y), continuing the fitted model and its optimizer state."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def predict(self, X):
        out = self._predict_raw(X)
        return out.ravel() if self.n_outputs_ == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def _mean_one(w):
    """Sample weights scaled to mean 1: fastreg's batch loss sum_r w_r l_r / B (Keras) then
    is scikit-learn's weighted average sum_r w_r l_r / sum_r w_r over a whole batch, so
    integer weights equal repeated rows (check_sample_weight_equivalence)."""
    total = float(np.sum(w))
    if not total > 0:
        raise ValueError("sample_weight sums to 0: no row would be trained on")
    return np.asarray(w, np.float64) * (len(w) / total)


class FastregClassifier(ClassifierMixin, _FastregEstimator):
    """A fastreg MLP as a scikit-learn classifier; labels of any type (classes_ sorted as
    LabelEncoder sorts them). Two classes: one sigmoid output (binary_crossentropy); more:
    softmax (sparse_categorical_crossentropy).

    Parameters are described in the module docstring (fastreg.sklearn). Fitted attributes:
    model_ (fr.Sequential), classes_, n_features_in_, feature_names_in_ (DataFrame input),
    history_, n_iter_."""

    _stratify = True

    def _target_check(self):
        return {}

    def _encode_targets(self, y, cold, classes):
        """(integer codes for model.fit, {"classes_": ...}): LabelEncoder's classes on a
        cold start (or partial_fit's `classes`), the fitted ones otherwise."""
        check_classification_targets(y)
        if cold:
            encoder = LabelEncoder().fit(y if classes is None else np.asarray(classes))
            known = encoder.classes_
            unseen = np.setdiff1d(np.unique(y), known)
            if unseen.size:
                raise ValueError(f"y has labels {unseen.tolist()} that are not in classes "
                                 f"{known.tolist()}")
            if len(known) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes in y, got "
                                 f"one class: {known.tolist()}")
        else:
            known = self.classes_
            if classes is not None and not np.array_equal(np.unique(np.asarray(classes)),
                                                          known):
                raise ValueError(f"classes={list(classes)} differs from the classes of the "
                                 f"first partial_fit {known.tolist()}")
            unseen = np.setdiff1d(np.unique(y), known)
            if unseen.size:
                raise ValueError(f"y has labels {unseen.tolist()} not seen in the first fit "
                                 f"(classes_ = {known.tolist()})")
        codes = np.searchsorted(known, y)
        return (codes.reshape(-1, 1) if len(known) == 2 else codes), {"classes_": known}

    def _output_spec(self, fitted):
        k = len(fitted["classes_"])
        if k == 2:
            return 1, "binary_crossentropy"
        return k, "sparse_categorical_crossentropy"

    def fit(self, X, y, sample_weight=None):
        """Train on X (n, features) and labels y (n,), rows weighted by sample_weight;
        returns self."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch on (X, y), continuing the fitted model and its optimizer state.
        classes: every label that will ever appear, required on the first call."""
        if not hasattr(self, "model_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit (every "
                             "label the classifier will see)")
        return self._fit(X, y, incremental=True, classes=classes, sample_weight=sample_weight)

    def predict_proba(self, X):
        """(n, n_classes) class probabilities, columns in the order of classes_."""
        p = self._predict_raw(X)      # checks that the classifier is fitted first
        if len(self.classes_) == 2:
            return np.hstack([1 - p, p])
        return p

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


# ---------------------------------------------------------------- pickling through save()
def _model_to_bytes(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def _model_from_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        with open(path, "wb") as f:
            f.write(data)
        return load_model(path)


__all__ = ["FastregRegressor", "FastregClassifier"]
