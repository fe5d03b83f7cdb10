"""Optimizers: hyperparameters only; their state (moments) lives with the model's parameters.

Update formulas are PyTorch's (bias correction, eps after the square root, AdamW's decoupled
decay w <- w - lr*wd*w); the fused kernels implement them (kernels/reference.py is the spec).
"""
from .kernels import contract as C
from .validation import check_in_dtype, check_real


def _positive(name, value):
    return check_real(name, value, 0.0, min_open=True)


def _unit(name, value, allow_zero=True):
    return check_real(name, value, 0.0, 1.0, min_open=not allow_zero, max_open=True)


class Optimizer:
    """A piece: its code (contract.OPTIMIZER_TABLE), the hyperparameter slots it fills
    (`slots`, owner "optimizer"), and the moments it keeps (`moments`). The update formulas
    live in kernels/reference/update.py, fused with the penalties in every backend."""
    code = None

    @property
    def moments(self):
        """The moment buffers the update needs: a subset of ("m", "v")."""
        return C.OPTIMIZER_BY_CODE[self.code].moments

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
        check_in_dtype("lr", self.lr, dtype)
        if getattr(self, "eps", None) is not None:
            check_in_dtype("eps", self.eps, dtype)

    def get_config(self):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    code = C.OPT_SGD

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False):
        self.lr = _positive("lr", lr)
        self.momentum = _unit("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")

    @property
    def moments(self):
        return ("m",) if self.momentum > 0 else ()

    def slots(self):
        return {"lr": self.lr, "beta1": self.momentum, "beta2": 0.0, "eps": 0.0,
                "nesterov": float(self.nesterov), "decoupled": 0.0}

    def get_config(self):
        return {"class": "SGD", "lr": self.lr, "momentum": self.momentum,
                "nesterov": self.nesterov}


class Adam(Optimizer):
    code = C.OPT_ADAM

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr = _positive("lr", lr)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.eps = _positive("eps", eps)

    def slots(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "nesterov": 0.0, "decoupled": 0.0}

    def get_config(self):
        return {"class": "Adam", "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps}


class AdamW(Adam):
    """Adam with decoupled weight decay on the kernels (biases are not decayed)."""
    code = C.OPT_ADAMW

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
        super().__init__(lr, beta1, beta2, eps)
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
