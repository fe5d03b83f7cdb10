"""Learning-rate schedules (Keras 3's names, arguments and formulas): pass one as an
optimizer's learning rate, ``fr.Adam(learning_rate=fr.schedules.CosineDecay(1e-3, 10_000))``.

A schedule maps the optimizer's step count (0 for the first update, as Keras' `iterations`)
to the learning rate of that update. The fit loop evaluates it for every step of a chunk of
batches at once (``rates(steps)``, float64) and the compiled epoch reads one rate per step,
so a schedule changes the rate at every step, not once per fit or per epoch.
"""
import math

import numpy as np


def _number(name, value, lo=None, lo_open=False, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return int(value) if integer else float(value)


class LearningRateSchedule:
    """A schedule: rates(steps) for an array of step counts; schedule(step) for one."""

    def rates(self, steps):
        raise NotImplementedError

    def __call__(self, step):
        return float(self.rates(np.asarray([step], np.float64))[0])

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = None


class _DecayEveryStep(LearningRateSchedule):
    """A decay of initial_learning_rate driven by p = step / decay_steps (floored with
    staircase=True): ExponentialDecay and InverseTimeDecay."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate, 0,
                                             lo_open=True)
        self.decay_steps = _number("decay_steps", decay_steps, 0, lo_open=True)
        self.decay_rate = _number("decay_rate", decay_rate, 0, lo_open=self.rate_positive)
        self.staircase = bool(staircase)

    rate_positive = True

    def _progress(self, steps):
        p = np.asarray(steps, np.float64) / self.decay_steps
        return np.floor(p) if self.staircase else p

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase}


class ExponentialDecay(_DecayEveryStep):
    """initial_learning_rate * decay_rate ** p."""

    def rates(self, steps):
        return self.initial_learning_rate * np.power(self.decay_rate, self._progress(steps))


class InverseTimeDecay(_DecayEveryStep):
    """initial_learning_rate / (1 + decay_rate * p)."""
    rate_positive = False       # decay_rate 0: a constant rate

    def rates(self, steps):
        return self.initial_learning_rate / (1.0 + self.decay_rate * self._progress(steps))


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] for step <= boundaries[0], values[i] for boundaries[i-1] < step <=
    boundaries[i], values[-1] after the last boundary."""

    def __init__(self, boundaries, values):
        boundaries = [_number("a boundary", b) for b in boundaries]
        values = [_number("a value", v, 0, lo_open=True) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"values must have one more entry than boundaries: got "
                             f"{len(values)} values for {len(boundaries)} boundaries")
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must increase, got {boundaries}")
        self.boundaries = boundaries
        self.values = values

    def rates(self, steps):
        # side="left": a step equal to a boundary is still in the range below it (Keras' <=)
        index = np.searchsorted(np.asarray(self.boundaries, np.float64),
                                np.asarray(steps, np.float64), side="left")
        return np.asarray(self.values, np.float64)[index]

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values)}


class PolynomialDecay(LearningRateSchedule):
    """(initial - end) * (1 - step / decay_steps) ** power + end, the step held at
    decay_steps; with cycle=True decay_steps grows to the next multiple past the step."""

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001, power=1.0,
                 cycle=False):
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate, 0,
                                             lo_open=True)
        self.decay_steps = _number("decay_steps", decay_steps, 0, lo_open=True)
        self.end_learning_rate = _number("end_learning_rate", end_learning_rate, 0)
        self.power = _number("power", power, 0, lo_open=True)
        self.cycle = bool(cycle)

    def rates(self, steps):
        s = np.asarray(steps, np.float64)
        d = np.full_like(s, self.decay_steps)
        if self.cycle:
            d = d * np.where(s == 0, 1.0, np.ceil(s / self.decay_steps))
        else:
            s = np.minimum(s, d)
        return ((self.initial_learning_rate - self.end_learning_rate)
                * np.power(1.0 - s / d, self.power) + self.end_learning_rate)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "end_learning_rate": self.end_learning_rate,
                "power": self.power, "cycle": self.cycle}


class CosineDecay(LearningRateSchedule):
    """With warmup_target: a linear warmup from initial_learning_rate to warmup_target over
    warmup_steps, then a cosine from warmup_target to warmup_target * alpha over decay_steps;
    without: the cosine from initial_learning_rate. Held at the end afterwards."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0):
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate, 0)
        self.decay_steps = _number("decay_steps", decay_steps, 0, lo_open=True)
        self.alpha = _number("alpha", alpha, 0)
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.warmup_target = (None if warmup_target is None
                              else _number("warmup_target", warmup_target, 0, lo_open=True))
        self.warmup_steps = _number("warmup_steps", warmup_steps, 0)
        if self.warmup_target is None and self.initial_learning_rate == 0:
            raise ValueError("initial_learning_rate 0 without a warmup_target would never "
                             "train")
        if self.warmup_target is not None and self.warmup_steps == 0:
            raise ValueError("warmup_target needs warmup_steps > 0")

    def _cosine(self, s, start):
        done = s / self.decay_steps
        return start * ((1 - self.alpha) * 0.5 * (1.0 + np.cos(np.pi * done)) + self.alpha)

    def rates(self, steps):
        s = np.asarray(steps, np.float64)
        if self.warmup_target is None:
            return self._cosine(np.minimum(s, self.decay_steps), self.initial_learning_rate)
        s = np.minimum(s, self.decay_steps + self.warmup_steps)
        warm = ((self.warmup_target - self.initial_learning_rate) * s / self.warmup_steps
                + self.initial_learning_rate)
        cool = self._cosine(s - self.warmup_steps, self.warmup_target)
        return np.where(s < self.warmup_steps, warm, cool)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha,
                "warmup_target": self.warmup_target, "warmup_steps": self.warmup_steps}


REGISTRY = {cls.__name__: cls for cls in (ExponentialDecay, PiecewiseConstantDecay,
                                          PolynomialDecay, CosineDecay, InverseTimeDecay)}


def to_config(schedule):
    return {"class": type(schedule).__name__, **schedule.get_config()}


def from_config(config):
    cfg = dict(config)
    cls = REGISTRY.get(cfg.pop("class", None))
    if cls is None:
        raise ValueError(f"unknown learning-rate schedule config {config!r}")
    return cls.from_config(cfg)


__all__ = ["LearningRateSchedule", "ExponentialDecay", "PiecewiseConstantDecay",
           "PolynomialDecay", "CosineDecay", "InverseTimeDecay"]
