"""Penalties and constraints on a layer's kernel (weights), as small explicit pieces.

Conventions (DESIGN.md): L2(l) adds l/2 * sum W^2 (gradient l*W, PyTorch's weight_decay);
L1(l) adds l * sum |W|, proximal by default (soft-thresholding after the optimizer step, in
the optimizer's own per-coordinate metric), which gives exact zeros; ElasticNet(l1, l2) both.
Penalties are not divided by batch or data-set size. (Used as a Dense's
activity_regularizer, on the layer's outputs, L1 / L2 / ElasticNet follow Keras instead:
(l1 * sum |a| + l2 * sum a^2) / batch rows: activity_strengths.) MaxNorm(c) is a constraint: after every
step each unit's incoming weight vector (a column of W) is projected to norm <= c.
GroupLasso(l) adds l * sum_j ||W[:, j]||_2, one group per unit (its incoming weights), applied
by block soft-thresholding after the step, so whole units reach exact zero (model.prune()
then removes them). WeightNoise(sigma) is not a penalty: it trains each step on W + sigma * n
(Graves 2011), the same as Dense(weight_noise=sigma).
"""
from dataclasses import dataclass

import numpy as np

from .kernels import contract
from .validation import check_real


def _check_strength(name, value):
    return check_real(name, value, 0.0, error=TypeError)


class Regularizer:
    """A piece: it declares the hyperparameter slots it fills (contract.SLOT_TABLE, owner
    "regularizer") and, for reading and tests, its math in NumPy (`penalty`). The fused
    update kernels implement every slot; `combine` merges the pieces on one tensor by the
    slots' rules."""
    l1 = 0.0
    l2 = 0.0
    proximal = True
    maxnorm = 0.0
    group = 0.0
    weight_noise = 0.0

    def slots(self):
        """{slot name: value} this regularizer sets (the others keep their defaults)."""
        raise NotImplementedError

    def penalty(self, w):
        """Its term of the objective for a kernel w (I, O), in float64 (0 for a constraint)."""
        return 0.0

    def get_config(self):
        raise NotImplementedError


@dataclass(frozen=True, init=False)
class L1(Regularizer):
    l: float
    proximal: bool

    def __init__(self, l=0.01, proximal=True):
        object.__setattr__(self, "l", _check_strength("L1 strength l", l))
        object.__setattr__(self, "proximal", bool(proximal))

    @property
    def l1(self):
        return self.l

    def slots(self):
        return {"l1": self.l, "proximal": float(self.proximal)}

    def penalty(self, w):
        return self.l * float(np.abs(np.asarray(w, np.float64)).sum())

    def get_config(self):
        return {"class": "L1", "l": self.l, "proximal": self.proximal}


@dataclass(frozen=True, init=False)
class L2(Regularizer):
    l: float

    def __init__(self, l=0.01):
        object.__setattr__(self, "l", _check_strength("L2 strength l", l))

    @property
    def l2(self):
        return self.l

    def slots(self):
        return {"l2": self.l}

    def penalty(self, w):
        return 0.5 * self.l * float((np.asarray(w, np.float64) ** 2).sum())

    def get_config(self):
        return {"class": "L2", "l": self.l}


@dataclass(frozen=True, init=False)
class ElasticNet(Regularizer):
    l1: float
    l2: float
    proximal: bool

    def __init__(self, l1=0.01, l2=0.01, proximal=True):
        object.__setattr__(self, "l1", _check_strength("ElasticNet l1", l1))
        object.__setattr__(self, "l2", _check_strength("ElasticNet l2", l2))
        object.__setattr__(self, "proximal", bool(proximal))

    def slots(self):
        return {"l1": self.l1, "l2": self.l2, "proximal": float(self.proximal)}

    def penalty(self, w):
        w = np.asarray(w, np.float64)
        return self.l1 * float(np.abs(w).sum()) + 0.5 * self.l2 * float((w ** 2).sum())

    def get_config(self):
        return {"class": "ElasticNet", "l1": self.l1, "l2": self.l2, "proximal": self.proximal}


@dataclass(frozen=True, init=False)
class MaxNorm(Regularizer):
    c: float

    def __init__(self, c=3.0):
        c = _check_strength("MaxNorm c", c)
        if c == 0:
            raise ValueError("MaxNorm c must be > 0 (a norm bound of 0 would zero every unit)")
        object.__setattr__(self, "c", c)

    @property
    def maxnorm(self):
        return self.c

    def slots(self):
        return {"maxnorm": self.c}

    def get_config(self):
        return {"class": "MaxNorm", "c": self.c}


@dataclass(frozen=True, init=False)
class GroupLasso(Regularizer):
    """l * sum over units j of ||W[:, j]||_2 (Yuan & Lin 2006, one group per unit's incoming
    weights). Proximal: after each optimizer step, every column is scaled by
    max(0, 1 - tau_j / ||W[:, j]||), so a unit whose weights the data do not hold up reaches
    exactly zero. tau_j = lr * l with SGD; with Adam the prox is taken in the column's mean
    Adam metric, tau_j = l * step_size / mean_i(sqrt(v_hat_ij) + eps) (an exact block prox in
    a diagonal metric has no closed form; with the Euclidean lr * l, Adam's normalised steps
    keep every unit alive: kernels/reference/update.py group_thresholds). Kernels only (not
    biases)."""
    l: float

    def __init__(self, l=0.01):
        object.__setattr__(self, "l", _check_strength("GroupLasso strength l", l))

    @property
    def group(self):
        return self.l

    def slots(self):
        return {"group": self.l}

    def penalty(self, w):
        return self.l * float(np.sqrt((np.asarray(w, np.float64) ** 2).sum(axis=0)).sum())

    def get_config(self):
        return {"class": "GroupLasso", "l": self.l}


@dataclass(frozen=True, init=False)
class WeightNoise(Regularizer):
    """Noise on the weights (Graves 2011), training only: every training step's forward and
    backward use W + sigma * n, n ~ N(0, 1) per element of the kernel W, drawn from Philox
    (stream STREAM_WEIGHT_NOISE, keyed by the step and the layer like dropout's masks:
    reproducible by the model's seed, a new draw every step and layer, regenerated and never
    stored). The gradient is taken at the perturbed weights; the update (and every penalty,
    prox and max-norm) acts on the clean W, which is all the model stores. Kernels only (the
    bias is never perturbed). Off in predict, evaluate and MC dropout, and ignored by
    export / to_keras / to_torch (it does not change inference). The same as
    Dense(weight_noise=sigma); sigma = 0 is no noise at all."""
    sigma: float

    def __init__(self, sigma=0.01):
        object.__setattr__(self, "sigma", _check_strength("WeightNoise sigma", sigma))

    @property
    def weight_noise(self):
        return self.sigma

    def slots(self):
        return {}       # no hyperparameter slot: a per-layer setting (LF_WEIGHT_NOISE_STD)

    def get_config(self):
        return {"class": "WeightNoise", "sigma": self.sigma}


REGISTRY = {"L1": L1, "L2": L2, "ElasticNet": ElasticNet, "MaxNorm": MaxNorm,
            "GroupLasso": GroupLasso, "WeightNoise": WeightNoise}


def from_config(cfg):
    cfg = dict(cfg)
    cls = REGISTRY.get(cfg.pop("class", None))
    if cls is None:
        raise ValueError(f"unknown regularizer in config: {cfg!r}")
    return cls(**cfg)


def as_list(reg, what="regularizer"):
    """None, one regularizer, or a list/tuple of them -> a list (validated)."""
    if reg is None:
        return []
    items = list(reg) if isinstance(reg, (list, tuple)) else [reg]
    for r in items:
        if not isinstance(r, Regularizer):
            raise TypeError(f"{what} must be a fastreg regularizer (L1, L2, ElasticNet, "
                            f"MaxNorm, GroupLasso, WeightNoise) or a list of them, got {r!r}")
    return items


def activity_strengths(reg, what="activity_regularizer"):
    """(l1, l2) of an activity penalty (Keras' activity_regularizer) from None, one L1, L2 or
    ElasticNet, or a list of them (their strengths add). Keras' formula, not the weights':
    the penalty of a layer's output a over a batch of B rows is
        (l1 * sum |a| + l2 * sum a^2) / B
    (L2(l) counts l * sum a^2 here, as Keras' L2 does, where on a kernel it adds
    l/2 * sum W^2; `proximal` does not apply: the gradient l1 * sign(a) / B goes into the
    backward). Anything else (MaxNorm, GroupLasso, a Keras object, a number) is a
    TypeError."""
    if reg is None:
        return 0.0, 0.0
    items = list(reg) if isinstance(reg, (list, tuple)) else [reg]
    l1 = l2 = 0.0
    for r in items:
        if not isinstance(r, (L1, L2, ElasticNet)):
            raise TypeError(f"{what} must be a fastreg L1, L2 or ElasticNet (or a list of "
                            f"them): a penalty on the layer's outputs, Keras' "
                            f"(l1 * sum |a| + l2 * sum a^2) / batch; got {r!r}")
        l1 += r.l1
        l2 += r.l2
    return l1, l2


REGULARIZER_SLOTS = [s for s in contract.SLOT_TABLE if s.owner == "regularizer"]


def combine(regs):
    """{slot name: value} of the regularizer slots that a list of regularizers adds up to,
    by each slot's rule (contract.SLOT_TABLE): penalties add, the tightest constraint wins,
    the L1 mode must agree among the pieces that have an L1 term."""
    out = {s.name: s.default for s in REGULARIZER_SLOTS}
    seen = {}
    for reg in regs:
        for name, value in reg.slots().items():
            slot = contract.SLOTS[name]
            if slot.combine == "sum":
                out[name] += value
            elif slot.combine == "min":
                out[name] = value if name not in seen else min(out[name], value)
            elif slot.combine == "agree":
                if name in seen and seen[name] != value:
                    raise ValueError("L1 penalties on one tensor must agree on "
                                     "proximal=True/False")
                out[name] = value
            seen.setdefault(name, value)
    return out
