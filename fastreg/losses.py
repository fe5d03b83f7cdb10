"""Losses: what compile(loss=...) takes, by Keras' names, as a string or an object.

    model.compile(loss="huber")                                   # delta 1.0
    model.compile(loss=fr.losses.Huber(delta=0.5))
    model.compile(loss=fr.losses.CategoricalCrossentropy(label_smoothing=0.1))

The formulas are the kernel contract's (kernels/contract.py LOSS_TABLE; kernels/reference/
loss.py is their spec): the cross-entropies take logits (a linear last Dense, or "softmax" on
the last Dense of a categorical one, which is the same logits path) and predict returns the
probabilities; poisson takes the log-rate and predict returns the rate exp(z). A loss object
stores its parameter only (scikit-learn style): the name says which row of the contract's
table it is, the parameter travels in the plan (contract.PF_LOSS_PARAM) and in saved models.
"""
import math

from .kernels import contract


def _default(code):
    return contract.LOSS_BY_CODE[code].default


class Loss:
    """A row of the contract's loss table and the value of its parameter (if it has one)."""

    name = ""

    @property
    def row(self):
        return contract.LOSS_BY_CODE[contract.LOSSES[self.name]]

    @property
    def code(self):
        return self.row.code

    @property
    def param(self):
        """The value of the row's parameter (contract.PF_LOSS_PARAM); 0 for none."""
        return float(getattr(self, self.row.param)) if self.row.param else 0.0

    def get_config(self):
        """The loss's name, or {"name": ..., <parameter>: value} when its parameter is not
        the default (what a saved model records)."""
        row = self.row
        if not row.param or self.param == row.default:
            return self.name
        return {"name": self.name, row.param: self.param}

    def __eq__(self, other):
        return type(other) is type(self) and other.param == self.param

    def __hash__(self):
        return hash((self.name, self.param))

    def __repr__(self):
        row = self.row
        arg = f"{row.param}={self.param!r}" if row.param else ""
        return f"{type(self).__name__}({arg})"


def _check_delta(delta):
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) \
            or not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"Huber delta must be a finite number > 0, got {delta!r}")
    return float(delta)


def _check_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not math.isfinite(label_smoothing) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got "
                         f"{label_smoothing!r}")
    return float(label_smoothing)


class MeanSquaredError(Loss):
    """mean (z - y)^2 over all elements ("mse")."""
    name = "mse"


class MeanAbsoluteError(Loss):
    """mean |z - y| over all elements ("mae"; torch's L1Loss)."""
    name = "mae"


class Huber(Loss):
    """0.5 d^2 where |d| <= delta, else delta * (|d| - 0.5 delta), d = z - y, the mean over
    all elements ("huber"; Keras' Huber, torch's HuberLoss)."""
    name = "huber"

    def __init__(self, delta=_default(contract.LOSS_HUBER)):
        self.delta = _check_delta(delta)


class LogCosh(Loss):
    """mean log(cosh(z - y)) over all elements ("log_cosh")."""
    name = "log_cosh"


class BinaryCrossentropy(Loss):
    """Sigmoid cross-entropy from logits, one independent probability per output (multi-label
    with K > 1 outputs), the mean over all elements ("binary_crossentropy")."""
    name = "binary_crossentropy"


class CategoricalCrossentropy(Loss):
    """Softmax cross-entropy from logits against one-hot or soft target rows (each summing
    to 1), the mean over rows ("categorical_crossentropy"). label_smoothing ls: targets
    (1 - ls) * y + ls / K."""
    name = "categorical_crossentropy"

    def __init__(self, label_smoothing=_default(contract.LOSS_CCE)):
        self.label_smoothing = _check_smoothing(label_smoothing)


class SparseCategoricalCrossentropy(Loss):
    """Softmax cross-entropy from logits against integer labels, the mean over rows
    ("sparse_categorical_crossentropy"). label_smoothing ls: the label's one-hot row
    smoothed to (1 - ls) * onehot + ls / K (torch's CrossEntropyLoss(label_smoothing))."""
    name = "sparse_categorical_crossentropy"

    def __init__(self, label_smoothing=_default(contract.LOSS_SCE)):
        self.label_smoothing = _check_smoothing(label_smoothing)


class Poisson(Loss):
    """mean exp(z) - y * z over all elements, z the last layer's log-rate ("poisson"; torch's
    PoissonNLLLoss(log_input=True), Keras' poisson of the rate exp(z)). Targets are counts
    or rates >= 0; predict returns the rate exp(z)."""
    name = "poisson"


CLASSES = {cls.name: cls for cls in (MeanSquaredError, MeanAbsoluteError, Huber, LogCosh,
                                     BinaryCrossentropy, CategoricalCrossentropy,
                                     SparseCategoricalCrossentropy, Poisson)}


def get(spec):
    """The Loss for a name (Keras' long names too), a Loss, or a saved config ({"name": ...,
    <parameter>: value}); a clear error for anything else."""
    if isinstance(spec, Loss):
        return spec
    if isinstance(spec, str):
        code = contract.LOSSES.get(spec)
        if code is None:
            raise ValueError(f"unknown loss {spec!r}; choose one of {sorted(contract.LOSSES)} or a "
                             f"fastreg.losses object")
        return CLASSES[contract.LOSS_BY_CODE[code].name]()
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        cls = CLASSES.get(contract.LOSS_BY_CODE[contract.LOSSES[spec["name"]]].name
                          if spec["name"] in contract.LOSSES else None)
        if cls is None:
            raise ValueError(f"unknown loss {spec['name']!r} in a loss config")
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            return cls(**params)
        except TypeError as exc:
            raise ValueError(f"bad parameters {params} for loss {spec['name']!r}: {exc}") \
                from None
    raise TypeError(f"loss must be the name of a loss ({sorted(contract.LOSSES)}) or a "
                    f"fastreg.losses object, got {spec!r}")


def of(name, param):
    """The Loss a network part holds (its canonical name and parameter value)."""
    loss = get(name)
    row = loss.row
    return get({"name": name, row.param: param}) if row.param else loss


__all__ = ["Loss", "get", "of"] + [cls.__name__ for cls in CLASSES.values()]
