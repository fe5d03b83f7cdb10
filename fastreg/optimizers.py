"""Optimizers: hyperparameters only; their state (moments) lives with the model's parameters.

Update formulas are PyTorch's (bias correction, eps after the square root, AdamW's decoupled
decay w <- w - lr*wd*w); the fused kernels implement them (kernels/reference.py is the spec).
"""
import numpy as np

from . import schedules
from .kernels import contract
from .validation import check_in_dtype, check_real


def _positive(name, value):
    return check_real(name, value, 0.0, min_open=True)


def _unit(name, value, allow_zero=True):
    return check_real(name, value, 0.0, 1.0, min_open=not allow_zero, max_open=True)


class _NotGiven:
    """The default of learning_rate and lr: not given (an explicit None is refused like any
    other value that is not a rate)."""

    def __repr__(self):
        return "default"


DEFAULT = _NotGiven()


def _given_rate(optimizer, learning_rate, lr, default):
    """Set the rate an optimizer was given: learning_rate (Keras' name), or lr (kept as an
    alias); not both."""
    if lr is not DEFAULT and learning_rate is not DEFAULT:
        raise ValueError("pass learning_rate or lr (its alias), not both")
    name = "lr" if lr is not DEFAULT else "learning_rate"
    value = lr if lr is not DEFAULT else learning_rate
    optimizer._learning_rate = _check_learning_rate(default if value is DEFAULT else value, name)


def _check_learning_rate(value, name="learning_rate"):
    """A number > 0 or a fastreg.schedules schedule (evaluated at every step)."""
    if isinstance(value, schedules.LearningRateSchedule):
        return value
    if isinstance(value, dict):     # a saved schedule
        return schedules.from_config(value)
    if callable(value):
        raise TypeError(f"learning_rate must be a number or a fastreg.schedules schedule "
                        f"(ExponentialDecay, CosineDecay, ...), got the callable {value!r}; "
                        f"for a function of the epoch use fr.LearningRateScheduler")
    return _positive(name, value)


def _clipping(clipnorm, clipvalue, global_clipnorm):
    """(contract CLIP_* mode, value) of Keras' three options: at most one, each > 0."""
    given = [(mode, name, v) for mode, name, v in (
        (contract.CLIP_NORM, "clipnorm", clipnorm), (contract.CLIP_VALUE, "clipvalue", clipvalue),
        (contract.CLIP_GLOBAL_NORM, "global_clipnorm", global_clipnorm)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of clipnorm, clipvalue and global_clipnorm, got "
                         f"{', '.join(name for _, name, _ in given)}")
    if not given:
        return contract.CLIP_NONE, 0.0
    mode, name, v = given[0]
    return mode, _positive(name, v)


_CLIP_NAMES = {contract.CLIP_NORM: "clipnorm", contract.CLIP_VALUE: "clipvalue",
               contract.CLIP_GLOBAL_NORM: "global_clipnorm"}


class Optimizer:
    """A piece: its code (contract.OPTIMIZER_TABLE), the hyperparameter slots it fills
    (`slots`, owner "optimizer"), and the moments it keeps (`moments`). The update formulas
    live in kernels/reference/update.py, fused with the penalties in every backend.

    `learning_rate` (alias `lr`) is a number or a schedule (fastreg.schedules). fit reads it
    for every chunk of batches it hands the compiled epoch and passes one rate per step
    (`step_rates`), so a schedule changes the rate at every step and an assignment from a
    callback (`model.optimizer.learning_rate = 1e-4`) takes effect from the next step.
    """
    code = None
    _learning_rate = None

    @property
    def learning_rate(self):
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._learning_rate = _check_learning_rate(value)

    lr = learning_rate      # the alias, read and written alike

    @property
    def schedule(self):
        """The schedule, or None for a constant rate."""
        lr = self._learning_rate
        return lr if isinstance(lr, schedules.LearningRateSchedule) else None

    def current_rate(self, iterations=0):
        """The rate of the update after `iterations` updates (Keras' optimizer.iterations)."""
        return float(self.step_rates(iterations, 1)[0])

    def step_rates(self, iterations, n):
        """float64 rates of the next n updates, the first after `iterations` updates."""
        if self.schedule is None:
            return np.full(int(n), float(self._learning_rate))
        rates = self.schedule.rates(np.arange(iterations, iterations + int(n), dtype=np.float64))
        return np.ascontiguousarray(rates, np.float64)

    clip = (contract.CLIP_NONE, 0.0)   # (contract CLIP_* mode, value): Keras' clipping options

    def _set_clipping(self, clipnorm, clipvalue, global_clipnorm):
        self.clip = _clipping(clipnorm, clipvalue, global_clipnorm)

    @property
    def clipnorm(self):
        return self.clip[1] if self.clip[0] == contract.CLIP_NORM else None

    @property
    def clipvalue(self):
        return self.clip[1] if self.clip[0] == contract.CLIP_VALUE else None

    @property
    def global_clipnorm(self):
        return self.clip[1] if self.clip[0] == contract.CLIP_GLOBAL_NORM else None

    def _clip_config(self):
        """{"clipnorm": c} (or clipvalue / global_clipnorm) when set, else {}: files of
        optimizers without clipping stay as they were."""
        return {_CLIP_NAMES[self.clip[0]]: self.clip[1]} if self.clip[0] else {}

    def _rate_config(self):
        """{"lr": number} (the format's key since round 1) or {"learning_rate": schedule}."""
        if self.schedule is None:
            return {"lr": self._learning_rate}
        return {"learning_rate": schedules.to_config(self.schedule)}

    @property
    def moments(self):
        """The moment buffers the update needs: a subset of ("m", "v")."""
        return contract.OPTIMIZER_BY_CODE[self.code].moments

    @property
    def needs_m(self):
        return "m" in self.moments

    @property
    def needs_v(self):
        return "v" in self.moments

    def slots(self):
        """{slot name: value} of the optimizer slots."""
        raise NotImplementedError

    def check_dtype(self, dtype):
        """The kernels round lr (and Adam's eps) to the model dtype once: they must stay
        finite and > 0 there (an eps of 1e-50 is 0 in float32, and 0 / 0 is NaN)."""
        if self.schedule is None:
            check_in_dtype("lr", self.lr, dtype)
        if getattr(self, "eps", None) is not None:
            check_in_dtype("eps", self.eps, dtype)

    def get_config(self):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    code = contract.OPT_SGD

    def __init__(self, learning_rate=DEFAULT, momentum=0.0, nesterov=False, lr=DEFAULT,
                 clipnorm=None, clipvalue=None, global_clipnorm=None):
        _given_rate(self, learning_rate, lr, 0.01)
        self._set_clipping(clipnorm, clipvalue, global_clipnorm)
        self.momentum = _unit("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")

    @property
    def moments(self):
        return ("m",) if self.momentum > 0 else ()

    def slots(self):
        return {"lr": self.current_rate(), "beta1": self.momentum, "beta2": 0.0, "eps": 0.0,
                "nesterov": float(self.nesterov), "decoupled": 0.0}

    def get_config(self):
        return {"class": "SGD", **self._rate_config(), "momentum": self.momentum,
                "nesterov": self.nesterov, **self._clip_config()}


class Adam(Optimizer):
    code = contract.OPT_ADAM

    def __init__(self, learning_rate=DEFAULT, beta1=0.9, beta2=0.999, eps=1e-8, lr=DEFAULT,
                 clipnorm=None, clipvalue=None, global_clipnorm=None):
        _given_rate(self, learning_rate, lr, 0.001)
        self._set_clipping(clipnorm, clipvalue, global_clipnorm)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.eps = _positive("eps", eps)

    def slots(self):
        return {"lr": self.current_rate(), "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "nesterov": 0.0, "decoupled": 0.0}

    def get_config(self):
        return {"class": "Adam", **self._rate_config(), "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, **self._clip_config()}


class AdamW(Adam):
    """Adam with decoupled weight decay on the kernels (biases are not decayed)."""
    code = contract.OPT_ADAMW

    def __init__(self, learning_rate=DEFAULT, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 lr=DEFAULT, clipnorm=None, clipvalue=None, global_clipnorm=None):
        super().__init__(learning_rate, beta1, beta2, eps, lr=lr, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm)
        self.weight_decay = check_real("weight_decay", weight_decay, 0.0)

    def slots(self):
        return dict(super().slots(), decoupled=self.weight_decay)

    def get_config(self):
        return dict(super().get_config(), **{"class": "AdamW",
                                             "weight_decay": self.weight_decay})


REGISTRY = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def get(opt):
    """An Optimizer instance from an instance, a name ("adam", "sgd", "adamw") or a config."""
    if opt is None:
        return Adam()
    if isinstance(opt, Optimizer):
        return opt
    if isinstance(opt, str):
        for name, cls in REGISTRY.items():
            if name.lower() == opt.lower():
                return cls()
        raise ValueError(f"unknown optimizer {opt!r}; choose one of {sorted(REGISTRY)}")
    if isinstance(opt, dict):
        cfg = dict(opt)
        cls = REGISTRY.get(cfg.pop("class", None))
        if cls is None:
            raise ValueError(f"unknown optimizer config {opt!r}")
        return cls(**cfg)
    raise TypeError(f"optimizer must be an Optimizer, a name or a config, got {opt!r}")
