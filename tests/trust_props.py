"""The trust properties: what fastreg promises about bad numbers, bad files, interruptions,
threads and memory, as checks over drawn cases (hypothesis strategies).

Each category has a strategy of cases and a check: ``check(case)`` returns when the promise
holds and raises ``Hole`` (an AssertionError naming what broke) when it does not; any other
exception escaping a check is a hole too. tests/test_trust_properties.py runs every category
under hypothesis (a bounded profile in CI, FASTREG_HYPOTHESIS_PROFILE=long for a longer run);
tests/trust_probe.py runs them without stopping at the first failure and counts, per
category, the cases tried and the cases clean.

Categories:
  nan          NaN in the weights propagates through every activation, prox and max-norm path
               of every backend: predict returns NaN, and training into NaN warns and ends with
               finite weights.
  divergence   after any fit (huge learning rates, huge targets) the weights and optimizer
               state are finite and give a finite loss on the last batch; a fit that warns
               holds the state of the end of its last recorded epoch.
  arguments    every argument: a valid value (NumPy scalars included) is accepted as the
               Python number is; an invalid one gives ValueError/TypeError naming the argument
               and leaves the model bitwise untouched.
  files        a damaged model file gives "'<path>' is not a valid (readable) fastreg model
               file: ..." with bounded memory, or loads into a valid state; save respects the
               umask, a file's mode and symlinks.
  interrupts   a Ctrl-C (SIGINT, delivered at a drawn point, or twice) propagates and leaves
               the state of the last completed step: the same weights as an uninterrupted run
               of that many steps, finite, history = completed epochs; BackupAndRestore
               resumes to the bitwise result of the uninterrupted fit.
  threads      two fits in two threads give the results of the same fits run one after the
               other, and leave the BLAS thread pools as they were.
  memory       fit does not copy a C-contiguous X of the model dtype, predict / evaluate do
               not convert all of X at once, an MC pass stacks at most 8192 rows.
"""
import _thread
import json
import os
import stat
import threading
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
from hypothesis import strategies as st

import fastreg as fr
from fastreg import backend as backends
from fastreg.training import chunk_batches


class Hole(AssertionError):
    """A broken promise."""


def require(cond, what):
    if not cond:
        raise Hole(what)


def available(name):
    try:
        backends.resolve(name)
        return True
    except (backends.BackendUnavailable, ValueError, ImportError):
        return False


CPU = [b for b in ("numpy", "numba", "cython") if available(b)]
ALL = CPU + (["cuda"] if available("cuda") else [])
ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", None]


def data(seed, n, d, k=1, loss="mse", dtype=np.float32):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    if loss == "sparse_categorical_crossentropy":
        y = rng.integers(0, k, n)
    elif loss == "binary_crossentropy":
        y = (rng.random((n, k)) < 0.5).astype(dtype)
    else:
        y = rng.standard_normal((n, k)).astype(dtype)
    return X, y


def counters(model):
    """The model's training counters (fastreg.network.Counters: step, t, epochs_run,
    mc_step)."""
    return model._network.counters


def moments(model):
    """The optimizer's moment buffers [m, v] (flat, the parameters' layout; empty where the
    optimizer keeps none), or None before the first fit made them."""
    net = model._network
    return [net.store.m, net.store.v] if net.built and net.moments_ready else None


def state_of(model):
    """Everything a fit may change, as copies (bitwise comparisons): the weights (BatchNorm
    statistics included), every optimizer moment, the counters."""
    def cp(xs):
        return None if xs is None else [np.array(x, copy=True) for x in xs]
    c = counters(model)
    return {"weights": cp(model.get_weights()) if model.built else None,
            "moments": cp(moments(model)),
            "step": c.step, "t": c.t, "epochs_run": c.epochs_run, "mc_step": c.mc_step}


def _zeros(xs):
    return xs is not None and all(not np.any(x) for x in xs)


def same_state(a, b):
    """Bitwise equal states (optimizer moments not allocated yet equal all-zero moments:
    both mean a fresh optimizer)."""
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list) or isinstance(y, list):
            if x is None or y is None or len(x) != len(y):
                if not ((x is None and (y is None or _zeros(y)))
                        or (y is None and _zeros(x))):
                    return False
                continue
            for u, v in zip(x, y):
                if u.shape != v.shape or not np.array_equal(u, v, equal_nan=True):
                    return False
        elif x != y:
            return False
    return True


def all_finite(model):
    arrays = list(model.get_weights()) + (moments(model) or [])
    return all(np.isfinite(a).all() for a in arrays)


def second_moments_ok(model):
    return all((v >= 0).all() for v in (moments(model) or [])[1:])


def quiet_fit(model, *args, **kwargs):
    """fit with warnings recorded: (history or exception, [warning messages])."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kwargs.setdefault("verbose", 0)
        out = model.fit(*args, **kwargs)
    return out, [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)
                 and "NaN or inf" in str(w.message)]


# ================================================================ nan
@st.composite
def nan_cases(draw):
    return {"backend": draw(st.sampled_from(CPU * 4 + [b for b in ALL if b not in CPU])),
            "act": draw(st.sampled_from(ACTIVATIONS)),
            "reg": draw(st.sampled_from(["none", "l1", "group", "maxnorm", "l1+maxnorm"])),
            "opt": draw(st.sampled_from(["sgd", "adam"])),
            "bn": draw(st.booleans()),
            "where": draw(st.sampled_from(["W0", "b0", "W1"])),
            "seed": draw(st.integers(0, 2 ** 16))}


def _regs(kind):
    return {"none": None, "l1": fr.L1(1e-3), "group": fr.GroupLasso(1e-3),
            "maxnorm": fr.MaxNorm(2.0), "l1+maxnorm": [fr.L1(1e-3), fr.MaxNorm(2.0)]}[kind]


def check_nan(case):
    """A NaN weight makes predict NaN; training from finite weights that become NaN (an L2 of
    1e300 overflows in float32) stops with the warning and finite weights."""
    be, act, seed = case["backend"], case["act"], case["seed"]
    layers = [fr.Dense(8, act, regularizer=_regs(case["reg"]))]
    if case["bn"]:
        layers.append(fr.BatchNorm())
    layers.append(fr.Dense(1))
    model = fr.Sequential(layers, input_dim=3, seed=seed)
    model.compile(optimizer=fr.SGD(0.01) if case["opt"] == "sgd" else fr.Adam(1e-2),
                  backend=be)
    X, y = data(seed, 16, 3)
    i = {"W0": 0, "b0": 1, "W1": 6 if case["bn"] else 2}[case["where"]]
    target = model._network.weight_list()[i]     # a live view (set_weights refuses NaN)
    target.reshape(-1)[seed % target.size] = np.nan
    p = model.predict(X)
    require(np.isnan(p).all(), f"{be}: a NaN in {case['where']} gave {np.isnan(p).sum()} NaN "
                               f"predictions of {p.size} ({act}, bn={case['bn']})")
    layers = [fr.Dense(8, act, regularizer=[fr.L2(1e300)] + (
        [] if _regs(case["reg"]) is None else list(np.atleast_1d(_regs(case["reg"])))))]
    if case["bn"]:
        layers.append(fr.BatchNorm())
    layers.append(fr.Dense(1))
    model = fr.Sequential(layers, input_dim=3, seed=seed)
    model.compile(optimizer=fr.SGD(0.01) if case["opt"] == "sgd" else fr.Adam(1e-2),
                  backend=be)
    before = state_of(model)
    _, warned = quiet_fit(model, X, y, epochs=2, batch_size=4)
    require(warned, f"{be}: weights that became NaN ({act}, {case['reg']}, bn={case['bn']}, "
                    f"{case['opt']}) trained on without the NaN/inf warning")
    require(all_finite(model), f"{be}: the fit warned but left non-finite weights or moments")
    require(same_state(state_of(model), before) or len(model.history.history.get("loss", [])),
            f"{be}: the fit warned before any epoch ended but did not restore the weights "
            f"from before it")


# ================================================================ divergence
@st.composite
def divergence_cases(draw):
    kind = draw(st.sampled_from(["sgd", "adam", "momentum"]))
    lr = draw(st.sampled_from([1e-2, 1.0, 1e3, 1e10, 1e20, 1e30, 1e38]))
    return {"backend": draw(st.sampled_from(CPU + (["cuda"] if "cuda" in ALL and
                                                  draw(st.integers(0, 29)) == 0 else []))),
            "opt": kind, "lr": lr,
            "y_scale": draw(st.sampled_from([1.0, 1e10, 1e18, 1e30])),
            "act": draw(st.sampled_from(ACTIVATIONS)),
            "bn": draw(st.booleans()),
            "epochs": draw(st.integers(1, 3)),
            "n": draw(st.integers(3, 40)),
            "batch": draw(st.integers(1, 16)),
            "multitask": draw(st.booleans()),
            "seed": draw(st.integers(0, 2 ** 16))}


def _optimizer(kind, lr):
    if kind == "sgd":
        return fr.SGD(lr)
    if kind == "momentum":
        return fr.SGD(lr, momentum=0.9)
    return fr.Adam(lr)


def _divergence_model(case):
    layers = [fr.Dense(6, case["act"])] + ([fr.BatchNorm()] if case["bn"] else [])
    if case["multitask"]:
        model = fr.MultiTask(layers, {"a": ([fr.Dense(1)], "mse"),
                                      "b": ([fr.Dense(4, "tanh"), fr.Dense(1)], "mse", 0.5)},
                             input_dim=2, seed=case["seed"])
        model.compile(optimizer=_optimizer(case["opt"], case["lr"]), backend=case["backend"])
    else:
        model = fr.Sequential(layers + [fr.Dense(1)], input_dim=2, seed=case["seed"])
        model.compile(optimizer=_optimizer(case["opt"], case["lr"]), backend=case["backend"])
    return model


def _last_batch_loss(model, X, y, batch):
    n = X.shape[0]
    lo = ((n - 1) // batch) * batch
    if isinstance(model, fr.MultiTask):
        return model.evaluate(X[lo:], {k: v[lo:] for k, v in y.items()})["loss"]
    return model.evaluate(X[lo:], y[lo:])


def check_divergence(case):
    X, y = data(case["seed"], case["n"], 2)
    y = (y * case["y_scale"]).astype(np.float32)
    if not np.isfinite(y).all():
        return
    if case["multitask"]:
        y = {"a": y, "b": y[::-1].copy()}
    model = _divergence_model(case)
    _, warned = quiet_fit(model, X, y, epochs=case["epochs"], batch_size=case["batch"],
                          shuffle=False)
    require(all_finite(model), f"{case['backend']}: after the fit (warned: {bool(warned)}) "
                               f"weights or optimizer moments are not finite")
    require(second_moments_ok(model), "a second moment is negative")
    loss = _last_batch_loss(model, X, y, case["batch"])
    if not warned:
        require(np.isfinite(loss), f"{case['backend']}: the fit ended silently with weights "
                                   f"whose loss on the last batch is {loss}")
        return
    done = len(model.history.history.get("loss", []))
    ref = _divergence_model(case)
    if done:
        quiet_fit(ref, X, y, epochs=done, batch_size=case["batch"], shuffle=False)
    require(same_state(state_of(model), state_of(ref)),
            f"{case['backend']}: the fit warned after {done} recorded epochs but the model "
            f"does not hold the state of the end of epoch {done}")


# ================================================================ arguments
# (where, argument name, how to call with a value). A call returns the object it built (a
# model, an optimizer...) or None; `model` is a compiled 3-2-1 model the call may touch.
def _fit_with(model, **kw):
    X, y = data(1, 10, 3)
    kw.setdefault("verbose", 0)
    return model.fit(X, y, **kw)


def _seq(**kw):
    return fr.Sequential([fr.Dense(2, "tanh"), fr.Dense(1)], **kw)


SITES = {
    # constructors
    "Dense.units": ("units", lambda m, v: fr.Dense(v)),
    "Dense.dropout": ("dropout", lambda m, v: fr.Dense(2, dropout=v)),
    "Dense.negative_slope": ("negative_slope", lambda m, v: fr.Dense(2, "leaky_relu",
                                                                    negative_slope=v)),
    "Dropout.rate": ("rate", lambda m, v: fr.Dropout(v)),
    "GaussianDropout.rate": ("rate", lambda m, v: fr.GaussianDropout(v)),
    "GaussianNoise.stddev": ("stddev", lambda m, v: fr.GaussianNoise(v)),
    "BatchNorm.momentum": ("momentum", lambda m, v: _seq_bn(momentum=v)),
    "BatchNorm.eps": ("eps", lambda m, v: _seq_bn(eps=v)),
    "SGD.lr": ("lr", lambda m, v: _compiled(fr.SGD(lr=v))),
    "SGD.momentum": ("momentum", lambda m, v: fr.SGD(momentum=v)),
    "Adam.lr": ("lr", lambda m, v: _compiled(fr.Adam(lr=v))),
    "Adam.beta1": ("beta1", lambda m, v: fr.Adam(beta1=v)),
    "Adam.beta2": ("beta2", lambda m, v: fr.Adam(beta2=v)),
    "Adam.eps": ("eps", lambda m, v: _compiled(fr.Adam(eps=v))),
    "AdamW.weight_decay": ("weight_decay", lambda m, v: fr.AdamW(weight_decay=v)),
    "L1.l": ("l", lambda m, v: fr.L1(v)),
    "L2.l": ("l", lambda m, v: fr.L2(v)),
    "ElasticNet.l1": ("l1", lambda m, v: fr.ElasticNet(l1=v)),
    "MaxNorm.c": ("c", lambda m, v: fr.MaxNorm(v)),
    "GroupLasso.l": ("l", lambda m, v: fr.GroupLasso(v)),
    "EarlyStopping.patience": ("patience", lambda m, v: fr.EarlyStopping(patience=v)),
    "EarlyStopping.min_delta": ("min_delta", lambda m, v: fr.EarlyStopping(min_delta=v)),
    "Sequential.input_dim": ("input_dim", lambda m, v: _seq(input_dim=v)),
    "Sequential.seed": ("seed", lambda m, v: _seq(seed=v)),
    "GaussianJitter.stddev": ("stddev", lambda m, v: fr.GaussianJitter(v)),
    "Mixup.alpha": ("alpha", lambda m, v: fr.Mixup(v)),
    "RandomShift.k": ("k", lambda m, v: fr.RandomShift(v)),
    # calls on a model
    "fit.epochs": ("epochs", lambda m, v: _fit_with(m, epochs=v)),
    "fit.batch_size": ("batch_size", lambda m, v: _fit_with(m, batch_size=v)),
    "fit.verbose": ("verbose", lambda m, v: _fit_with(m, verbose=v)),
    "predict.batch_size": ("batch_size", lambda m, v: m.predict(data(2, 9, 3)[0],
                                                                batch_size=v)),
    "predict.mc_samples": ("mc_samples", lambda m, v: m.predict(data(2, 3, 3)[0],
                                                                mc_samples=v)),
    "predict.seed": ("seed", lambda m, v: m.predict(data(2, 3, 3)[0], mc_samples=2, seed=v)),
    "evaluate.batch_size": ("batch_size", lambda m, v: m.evaluate(*data(2, 9, 3),
                                                                  batch_size=v)),
    "sweep.seed": ("seed", lambda m, v: fr.sweep(_sweep_build, {"w": [2]}, *data(3, 8, 3),
                                                 epochs=1, batch_size=4, seed=v,
                                                 as_frame=False)),
}


def _seq_bn(**kw):
    model = fr.Sequential([fr.Dense(2), fr.BatchNorm(**kw), fr.Dense(1)], input_dim=3)
    model.compile(backend="numpy")
    return model


def _compiled(opt):
    model = _seq(input_dim=3)
    model.compile(optimizer=opt, backend="numpy")
    return model


def _sweep_build(w, seed):
    model = fr.Sequential([fr.Dense(w, "tanh"), fr.Dense(1)], input_dim=3, seed=seed)
    model.compile(backend="numpy")
    return model


F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _real(v):
    return (not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer,
                                                                    np.floating))
            and np.isfinite(float(v)))


def _int(v):
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def _in_f32(v):
    f = np.float32(v) if _real(v) and abs(float(v)) < 1e300 else np.float32(np.inf)
    return bool(np.isfinite(f) and f > 0)


VALID = {   # site -> is v a valid value (the promise: accepted iff valid)
    "Dense.units": lambda v: _int(v) and 1 <= v < 2 ** 31,
    "Dense.dropout": lambda v: _real(v) and 0 <= v < 1,
    "Dense.negative_slope": lambda v: _real(v) and v >= 0,
    "Dropout.rate": lambda v: _real(v) and 0 <= v < 1,
    "GaussianDropout.rate": lambda v: _real(v) and 0 <= v < 1,
    "GaussianNoise.stddev": lambda v: _real(v) and v >= 0,
    "BatchNorm.momentum": lambda v: _real(v) and 0 < v < 1 and np.float32(v) < 1,
    "BatchNorm.eps": lambda v: _real(v) and v > 0 and _in_f32(v),
    "SGD.lr": lambda v: _real(v) and v > 0 and _in_f32(v),
    "SGD.momentum": lambda v: _real(v) and 0 <= v < 1,
    "Adam.lr": lambda v: _real(v) and v > 0 and _in_f32(v),
    "Adam.beta1": lambda v: _real(v) and 0 <= v < 1,
    "Adam.beta2": lambda v: _real(v) and 0 <= v < 1,
    "Adam.eps": lambda v: _real(v) and v > 0 and _in_f32(v),
    "AdamW.weight_decay": lambda v: _real(v) and v >= 0,
    "L1.l": lambda v: _real(v) and v >= 0,
    "L2.l": lambda v: _real(v) and v >= 0,
    "ElasticNet.l1": lambda v: _real(v) and v >= 0,
    "MaxNorm.c": lambda v: _real(v) and v > 0,
    "GroupLasso.l": lambda v: _real(v) and v >= 0,
    "EarlyStopping.patience": lambda v: _int(v) and v >= 0,
    "EarlyStopping.min_delta": lambda v: _real(v) and v >= 0,
    "Sequential.input_dim": lambda v: v is None or (_int(v) and 1 <= v < 2 ** 31),
    "Sequential.seed": lambda v: _int(v) and 0 <= v < 2 ** 64,
    "GaussianJitter.stddev": lambda v: _real(v) and v >= 0,
    "Mixup.alpha": lambda v: _real(v) and v > 0,
    "RandomShift.k": lambda v: _int(v) and v >= 0,
    "fit.epochs": lambda v: _int(v) and 1 <= v <= 3,
    "fit.batch_size": lambda v: _int(v) and v >= 1,
    "fit.verbose": lambda v: _int(v) and v in (0, 2),
    "predict.batch_size": lambda v: v is None or (_int(v) and v >= 1),
    "predict.mc_samples": lambda v: v is None or (_int(v) and 1 <= v <= 64),
    "predict.seed": lambda v: v is None or (_int(v) and 0 <= v < 2 ** 64),
    "evaluate.batch_size": lambda v: v is None or (_int(v) and v >= 1),
    "sweep.seed": lambda v: _int(v) and 0 <= v < 2 ** 64,
}

# values outside what a valid call may cost here (fit for 2**40 epochs) are drawn invalid
_SKIP_VALID_BUT_HUGE = {"fit.epochs": lambda v: _int(v) and v > 3,
                        "predict.mc_samples": lambda v: _int(v) and v > 64,
                        "fit.verbose": lambda v: _int(v) and v == 1}

_VALUES = [0, 1, 2, 3, -1, 1.5, 0.5, 0.999999999, 1e-3, 1e-300, 1e-50, 1e39, 1e300, 2 ** 31,
           2 ** 62, 2 ** 63, 2 ** 64, True, False, None, "8", float("nan"), float("inf"),
           complex(1, 1), [1]]
_NUMPY = [np.float32(1e-3), np.float64(0.5), np.float32(0.5), np.int64(8), np.int32(2),
          np.uint8(3), np.int64(0), np.float32(2.0), np.bool_(True), np.float16(0.25),
          np.int64(-3), np.float32(np.nan), np.uint64(2 ** 63)]


@st.composite
def argument_cases(draw):
    site = draw(st.sampled_from(sorted(SITES)))
    value = draw(st.one_of(st.sampled_from(_VALUES), st.sampled_from(_NUMPY),
                           st.integers(-4, 40), st.floats(-2, 50, allow_nan=False)))
    return {"site": site, "value": value}


def _arg_model():
    model = fr.Sequential([fr.Dense(2, "tanh"), fr.Dense(1)], input_dim=3, seed=1)
    model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    return model


def _python_twin(v):
    """The Python number a NumPy scalar stands for (or v itself)."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _result_key(out):
    """A comparable summary of what a call returned."""
    if out is None:
        return None
    if hasattr(out, "get_config"):
        try:
            return json.dumps(out.get_config(), sort_keys=True, default=str)
        except Exception:
            return repr(out)
    if hasattr(out, "history"):
        return json.dumps(out.history, sort_keys=True, default=str)
    if hasattr(out, "__dict__") and not isinstance(out, np.ndarray):
        return json.dumps(vars(out), sort_keys=True, default=repr)
    if isinstance(out, tuple):
        return tuple(np.asarray(o).tobytes() for o in out)
    if isinstance(out, np.ndarray):
        return out.tobytes()
    if isinstance(out, float):
        return out
    if isinstance(out, list):
        return json.dumps([{k: v for k, v in r.items() if k != "time_s"} for r in out],
                          sort_keys=True, default=str)
    return repr(out)


def check_arguments(case):
    site, value = case["site"], case["value"]
    name, call = SITES[site]
    if site in _SKIP_VALID_BUT_HUGE and _SKIP_VALID_BUT_HUGE[site](value):
        return
    valid = VALID[site](value)
    model = _arg_model()
    before = state_of(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call(model, value)
    except (ValueError, TypeError) as exc:
        require(not valid, f"{site}={value!r} is valid but was refused: {exc}")
        require(name in str(exc), f"{site}={value!r}: the error does not name {name!r}: {exc}")
        require(same_state(state_of(model), before),
                f"{site}={value!r}: the refused call changed the model")
        return
    except Hole:
        raise
    except Exception as exc:
        raise Hole(f"{site}={value!r}: {type(exc).__name__} instead of a clear "
                   f"ValueError/TypeError: {exc}") from exc
    require(valid, f"{site}={value!r} is invalid but was accepted")
    twin = _python_twin(value)
    if twin is not value:   # a NumPy scalar: the same result as the Python number
        model2 = _arg_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out2 = call(model2, twin)
        require(_result_key(out) == _result_key(out2),
                f"{site}={value!r} gives another result than {twin!r}")


@st.composite
def api_misuse_cases(draw):
    return draw(st.sampled_from([
        "callbacks_not_a_list", "loss_list", "set_weights_none", "set_weights_complex",
        "y_complex", "y_val_complex", "dense_2_63", "bn_eps_f32", "cython_batch_gt_rows",
        "batch_2_62", "evaluate_batch_true", "set_weights_str", "compile_backend_list",
        "optimizer_np_lr", "fit_x_complex_f64"]))


def check_api_misuse(case):
    model = _arg_model()
    X, y = data(4, 10, 3)
    before = state_of(model)

    def refused(fn, *names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except (ValueError, TypeError) as exc:
            require(any(n in str(exc) for n in names),
                    f"{case}: the error names none of {names}: {exc}")
            require(same_state(state_of(model), before), f"{case}: refused but changed the model")
            return
        except Exception as exc:
            raise Hole(f"{case}: {type(exc).__name__}: {exc}") from exc
        raise Hole(f"{case}: accepted")

    if case == "callbacks_not_a_list":
        refused(lambda: model.fit(X, y, callbacks=fr.EarlyStopping(monitor="loss"), verbose=0),
                "callbacks")
    elif case == "loss_list":
        refused(lambda: model.compile(loss=["mse"]), "loss")
    elif case == "set_weights_none":
        refused(lambda: model.set_weights(None), "set_weights", "weights")
    elif case == "set_weights_str":
        refused(lambda: model.set_weights("abc"), "set_weights", "weights")
    elif case == "set_weights_complex":
        w = [a.astype(np.complex64) + 1j for a in model.get_weights()]
        refused(lambda: model.set_weights(w), "weight", "real")
    elif case == "y_complex":
        refused(lambda: model.fit(X, y + 1j, verbose=0), "y")
    elif case == "y_val_complex":
        refused(lambda: model.fit(X, y, validation_data=(X, y + 1j), verbose=0), "y_val")
    elif case == "fit_x_complex_f64":
        refused(lambda: model.fit(X + 0j, y, verbose=0), "X")
    elif case == "dense_2_63":
        refused(lambda: fr.Sequential([fr.Dense(2 ** 63)], input_dim=2), "units")
    elif case == "bn_eps_f32":
        refused(lambda: fr.Sequential([fr.Dense(2), fr.BatchNorm(eps=1e-300), fr.Dense(1)],
                                      input_dim=3), "eps")
    elif case == "evaluate_batch_true":
        refused(lambda: model.evaluate(X, y, batch_size=True), "batch_size")
    elif case == "compile_backend_list":
        refused(lambda: model.compile(backend=["numba"]), "backend")
    elif case == "optimizer_np_lr":
        opt = fr.Adam(lr=np.float32(1e-3))
        require(opt.lr == float(np.float32(1e-3)), "np.float32 lr not kept")
    elif case in ("cython_batch_gt_rows", "batch_2_62"):
        be = "cython" if case == "cython_batch_gt_rows" and "cython" in CPU else "numba"
        m = fr.Sequential([fr.Dense(2, "tanh"), fr.Dense(1)], input_dim=3, seed=1)
        m.compile(backend=be)
        bs = 64 if case == "cython_batch_gt_rows" else 2 ** 62
        ref = fr.Sequential([fr.Dense(2, "tanh"), fr.Dense(1)], input_dim=3, seed=1)
        ref.compile(backend=be)
        try:
            m.fit(X, y, batch_size=bs, verbose=0)
        except Exception as exc:
            raise Hole(f"{case}: batch_size={bs} with 10 rows failed: {type(exc).__name__}: "
                       f"{exc}") from exc
        ref.fit(X, y, batch_size=10, verbose=0)
        require(same_state(state_of(m), state_of(ref)),
                f"{case}: batch_size={bs} is not one batch of all rows")


# ================================================================ files
_BOMB = {}


def _bomb_member(nbytes=1 << 28):
    """A deflated .npy member of nbytes zeros (a few hundred KB in the archive)."""
    if nbytes not in _BOMB:
        import io
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            hdr = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                hdr, {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)})
            with z.open("pad.npy", "w", force_zip64=True) as f:
                f.write(hdr.getvalue())
                zeros = bytes(1 << 20)
                for _ in range(nbytes >> 20):
                    f.write(zeros)
        _BOMB[nbytes] = buf.getvalue()
    return _BOMB[nbytes]


MUTATIONS = ["none", "input_dim_huge", "input_dim_neg", "input_dim_float", "input_dim_bool",
             "units_huge", "units_2_63", "deep_json", "deep_layer", "step_neg", "step_float",
             "step_huge", "t_str", "epochs_run_bool", "mc_step_huge", "dtype_complex",
             "dtype_int", "W0_nan", "W0_complex", "W0_bool", "W0_shape", "W0_header_huge",
             "mW0_nan", "vW0_neg", "vW0_inf", "bnstat_var_neg", "bnstat_nan", "bn_inf",
             "unused_bomb", "missing_W1", "missing_config", "truncate", "flip_bytes",
             "layer_unknown_key", "layer_bad_activation", "optimizer_bad_lr",
             "version_future", "config_not_object", "seed_neg", "config_huge_string"]


@st.composite
def file_cases(draw):
    return {"mutation": draw(st.sampled_from(MUTATIONS)),
            "multitask": draw(st.booleans()),
            "bn": draw(st.booleans()),
            "trained": draw(st.booleans()),
            "where": draw(st.integers(0, 10 ** 6)),
            "seed": draw(st.integers(0, 2 ** 16))}


def _file_model(case):
    layers = [fr.Dense(4, "relu")] + ([fr.BatchNorm()] if case["bn"] else [])
    if case["multitask"]:
        model = fr.MultiTask(layers, {"h": ([fr.Dense(1)], "mse")}, input_dim=3,
                             seed=case["seed"])
        model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
        if case["trained"]:
            X, y = data(case["seed"], 12, 3)
            model.fit(X, {"h": y}, epochs=1, batch_size=4, verbose=0)
    else:
        model = fr.Sequential(layers + [fr.Dense(1)], input_dim=3, seed=case["seed"])
        model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
        if case["trained"]:
            model.fit(*data(case["seed"], 12, 3), epochs=1, batch_size=4, verbose=0)
    return model


def _members(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _mutate(path, case):
    """Rewrite the model file at `path` with case's mutation."""
    m = case["mutation"]
    mem = _members(path)
    cfg = json.loads(str(mem["config"]))
    prefix = "p0_" if cfg.get("format") == "fastreg-multitask" else ""
    layers = cfg["trunk"] if prefix else cfg["layers"]

    def key(name):
        return prefix + name
    raw = None
    if m == "none":
        pass
    elif m.startswith("input_dim"):
        cfg["input_dim"] = {"input_dim_huge": 20_000_000, "input_dim_neg": -3,
                            "input_dim_float": 3.5, "input_dim_bool": True}[m]
    elif m in ("units_huge", "units_2_63"):
        layers[0]["units"] = 10 ** 9 if m == "units_huge" else 2 ** 63
    elif m == "deep_json":
        raw = "[" * 200000 + "]" * 200000
    elif m == "deep_layer":
        layers[0]["regularizer"] = json.loads("[" * 900 + "]" * 900)
    elif m.startswith(("step_", "t_", "epochs_run_", "mc_step_")):
        field, _, kind = m.rpartition("_")
        field = {"step": "step", "t": "t", "epochs_run": "epochs_run", "mc_step": "mc_step",
                 "mc_step_huge": "mc_step"}.get(field, field)
        cfg[field] = {"neg": -1, "float": 2.5, "huge": 2 ** 70, "str": "5", "bool": True}[kind]
    elif m == "dtype_complex":
        cfg["dtype"] = "complex64"
    elif m == "dtype_int":
        cfg["dtype"] = "int32"
    elif m == "W0_nan":
        mem[key("W0")] = mem[key("W0")].copy()
        mem[key("W0")].flat[case["where"] % mem[key("W0")].size] = np.nan
    elif m == "W0_complex":
        mem[key("W0")] = mem[key("W0")].astype(np.complex64) + 1j
    elif m == "W0_bool":
        mem[key("W0")] = mem[key("W0")] > 0
    elif m == "W0_shape":
        mem[key("W0")] = np.zeros((7, 7), np.float32)
    elif m in ("mW0_nan", "vW0_neg", "vW0_inf"):
        name = key(m[:3])
        if name not in mem:
            return False
        mem[name] = mem[name].copy()
        mem[name].flat[case["where"] % mem[name].size] = {"mW0_nan": np.nan, "vW0_neg": -1.0,
                                                          "vW0_inf": np.inf}[m]
    elif m in ("bnstat_var_neg", "bnstat_nan", "bn_inf"):
        name = key("bnstat0" if m.startswith("bnstat") else "bn0")
        if name not in mem:
            return False
        mem[name] = mem[name].copy()
        row = 1 if m == "bnstat_var_neg" else case["where"] % 2
        mem[name][row, case["where"] % mem[name].shape[1]] = {
            "bnstat_var_neg": -1.0, "bnstat_nan": np.nan, "bn_inf": np.inf}[m]
    elif m == "missing_W1":      # the second Dense's kernel (a MultiTask head's first)
        mem.pop(key("W1") if key("W1") in mem else "p1_W0")
    elif m == "missing_config":
        mem.pop("config")
    elif m == "layer_unknown_key":
        layers[0]["surprise"] = 1
    elif m == "layer_bad_activation":
        layers[0]["activation"] = 5
    elif m == "optimizer_bad_lr":
        cfg["compile"]["optimizer"]["lr"] = -1.0
    elif m == "version_future":
        cfg["version"] = 99
    elif m == "config_not_object":
        raw = "[1, 2, 3]"
    elif m == "seed_neg":
        cfg["seed"] = -5
    elif m == "config_huge_string":
        cfg["pad"] = "x" * (5 << 20)      # over modelfile.MAX_CONFIG_CHARS
    if "config" in mem:
        mem["config"] = np.array(raw if raw is not None else json.dumps(cfg))
    if m == "W0_header_huge":
        _write_with_huge_header(path, mem, key("W0"))
        return True
    if m == "unused_bomb":     # the archive starts as the bomb; the members are added after
        with open(path, "wb") as f:
            f.write(_bomb_member())
        with zipfile.ZipFile(path, "a") as z:
            for k, a in mem.items():
                with z.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
        return True
    np.savez(path, **mem)
    if m == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(case["where"] % size)
    elif m == "flip_bytes":
        with open(path, "r+b") as f:
            buf = bytearray(f.read())
            for k in range(8):
                buf[(case["where"] * 7919 + k * 104729) % len(buf)] ^= 0xA5
            f.seek(0)
            f.write(buf)
    return True


def _write_with_huge_header(path, mem, name):
    """Members as np.savez writes them, but `name` declares 10**8 rows and holds a few bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for k, a in mem.items():
            with z.open(k + ".npy", "w") as f:
                if k == name:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": "<f4", "fortran_order": False,
                            "shape": (10 ** 8, a.shape[1] if a.ndim == 2 else 1)})
                    f.write(b"\0" * 64)
                else:
                    np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def _valid_loaded(model):
    require(all_finite(model), "a loaded model holds non-finite weights or moments")
    require(second_moments_ok(model), "a loaded model holds a negative second moment")
    for st_ in (model._network.running_stats() if model.built else []):
        if st_.size:
            require((st_[1] >= 0).all(), "a loaded model holds a negative BatchNorm variance")
    c = counters(model)
    for value in (c.step, c.t, c.epochs_run, c.mc_step):
        require(type(value) is int and value >= 0, f"a loaded counter is {value!r}")
    if model.built:
        X = data(0, 5, model.input_dim)[0]
        out = model.predict(X)
        outs = out.values() if isinstance(out, dict) else [out]
        require(all(np.isfinite(o).all() for o in outs), "a loaded model predicts non-finite")


LOAD_PEAK_BYTES = 64 << 20


def check_files(case, tmp):
    path = os.path.join(tmp, f"m{case['seed']}.npz")
    model = _file_model(case)
    model.save(path)
    if not _mutate(path, case):
        return
    tracemalloc.start()
    try:
        loaded = fr.load_model(path)
        error = None
    except (ValueError, FileNotFoundError) as exc:
        error = exc
    except Exception as exc:
        tracemalloc.stop()
        raise Hole(f"{case['mutation']}: {type(exc).__name__} instead of a clear error: "
                   f"{str(exc)[:200]}") from exc
    finally:
        if tracemalloc.is_tracing():
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    require(peak < LOAD_PEAK_BYTES, f"{case['mutation']}: loading took {peak / 2 ** 20:.0f} MiB")
    if error is not None:
        msg = str(error)
        require(f"{path!r} is not a valid fastreg model file" in msg
                or f"{path!r} is not a readable fastreg model file" in msg,
                f"{case['mutation']}: message {msg[:200]!r}")
        return
    require(case["mutation"] in ("none", "unused_bomb") or case["mutation"] == "flip_bytes"
            or case["mutation"] == "truncate",
            f"{case['mutation']}: the damaged file was accepted")
    _valid_loaded(loaded)


@st.composite
def save_cases(draw):
    return {"umask": draw(st.sampled_from([0o022, 0o077, 0o002, 0o027])),
            "existing": draw(st.sampled_from([None, 0o644, 0o600, 0o664])),
            "symlink": draw(st.booleans()),
            "seed": draw(st.integers(0, 2 ** 16))}


def check_save(case, tmp):
    model = _seq(input_dim=3, seed=case["seed"])
    target = os.path.join(tmp, f"t{case['seed']}-{case['umask']}.npz")
    path = target
    for p in (target, target + ".lnk"):
        if os.path.lexists(p):
            os.unlink(p)
    if case["existing"] is not None:
        with open(target, "wb") as f:
            f.write(b"old")
        os.chmod(target, case["existing"])
    if case["symlink"]:
        path = target + ".lnk"
        os.symlink(os.path.basename(target), path)
    old = os.umask(case["umask"])
    try:
        model.save(path)
    finally:
        os.umask(old)
    if case["symlink"]:
        require(os.path.islink(path), "save replaced the symlink by a file")
    require(os.path.isfile(target), "save did not write the symlink's target")
    mode = stat.S_IMODE(os.stat(target).st_mode)
    want = case["existing"] if case["existing"] is not None else 0o666 & ~case["umask"]
    require(mode == want, f"saved with mode {oct(mode)}, expected {oct(want)} (umask "
                          f"{oct(case['umask'])}, existing {case['existing'] and oct(case['existing'])})")
    loaded = fr.load_model(path)
    require(all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(),
                                                     model.get_weights())), "round trip")


# ================================================================ interrupts
@st.composite
def interrupt_cases(draw):
    return {"backend": draw(st.sampled_from(CPU)),
            "trigger": draw(st.sampled_from(["chunk", "epoch_end", "timer", "timer2"])),
            "at": draw(st.integers(0, 12)),
            "delay": draw(st.floats(0.0, 0.3)),
            "verbose": draw(st.sampled_from([0, 2])),
            "epochs": draw(st.integers(1, 4)),
            "n": draw(st.integers(8, 60)),
            "batch": draw(st.integers(1, 8)),
            "multitask": draw(st.booleans()),
            "dropout": draw(st.sampled_from([0.0, 0.3])),
            "seed": draw(st.integers(0, 2 ** 16))}


def _int_model(case):
    layers = [fr.Dense(6, "tanh", dropout=case["dropout"]), fr.BatchNorm()]
    if case["multitask"]:
        model = fr.MultiTask(layers, {"a": ([fr.Dense(1)], "mse")}, input_dim=3,
                             seed=case["seed"])
    else:
        model = fr.Sequential(layers + [fr.Dense(1)], input_dim=3, seed=case["seed"])
    model.compile(optimizer=fr.Adam(1e-2), backend=case["backend"])
    return model


def _int_data(case):
    X, y = data(case["seed"], case["n"], 3)
    return X, ({"a": y} if case["multitask"] else y)


def _subset(y, rows):
    return {k: v[rows] for k, v in y.items()} if isinstance(y, dict) else y[rows]


def reference_after_steps(case, steps):
    """A fresh model trained for exactly `steps` steps of the same fit (whole epochs, then
    the first whole batches of the next epoch in its shuffled order)."""
    X, y = _int_data(case)
    ref = _int_model(case)
    nb = -(-case["n"] // case["batch"])
    epochs, part = divmod(steps, nb)
    if epochs:
        ref.fit(X, y, epochs=epochs, batch_size=case["batch"], verbose=0)
    if part:
        perm = np.random.default_rng([ref.seed, counters(ref).epochs_run]).permutation(
            case["n"])
        rows = perm[:part * case["batch"]]
        ref.fit(X[rows], _subset(y, rows), epochs=1, batch_size=case["batch"], shuffle=False,
                verbose=0)
    return ref


def _fire(delays, running):
    for d in delays:
        time.sleep(d)
        if running.is_set():
            _thread.interrupt_main()


def _absorb():
    """Let a SIGINT that is still pending be delivered here."""
    for _ in range(3):
        try:
            time.sleep(0.005)
        except KeyboardInterrupt:
            pass


def run_interrupted(model, case, X, y):
    """fit under the case's Ctrl-C; (interrupted?, model)."""
    trigger = case["trigger"]
    callbacks = []
    ops_patch = None
    if trigger == "epoch_end":
        class CtrlC(fr.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == case["at"] % case["epochs"]:
                    _thread.interrupt_main()
        callbacks.append(CtrlC())
    elif trigger == "chunk":    # a press while the backend trains a chunk of batches
        calls = {"n": 0}
        module = backends.get(model.backend).module
        real = module.train_epoch

        def wrapped(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == case["at"] + 1:
                _thread.interrupt_main()
            return out
        module.train_epoch = wrapped
        ops_patch = (module, real)
    running = threading.Event()
    timer = None
    if trigger in ("timer", "timer2"):
        delays = [case["delay"]] + ([case["delay"] / 3] if trigger == "timer2" else [])
        timer = threading.Thread(target=_fire, args=(delays, running), daemon=True)
    interrupted = False
    try:
        try:
            running.set()
            if timer is not None:
                timer.start()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X, y, epochs=case["epochs"], batch_size=case["batch"],
                          callbacks=callbacks, verbose=case["verbose"])
        finally:
            running.clear()
            if timer is not None:
                while timer.is_alive():
                    try:
                        timer.join(0.01)
                    except KeyboardInterrupt:
                        interrupted = True
            if ops_patch is not None:
                ops_patch[0].train_epoch = ops_patch[1]
            try:
                _absorb()
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        interrupted = True
    _absorb()
    return interrupted


def _steps_after_chunks(case, model, k):
    """Training steps done by the first k chunks of the fit (fit's chunking, verbose != 1)."""
    batch = min(case["batch"], case["n"])
    nb = -(-case["n"] // batch)
    per = chunk_batches(batch, model._network.kernels())
    if case["verbose"] == 1:
        per = min(per, max(1, -(-nb // 20)))
    sizes = [min(per, nb - first) for first in range(0, nb, per)] * case["epochs"]
    return sum(sizes[:k])


def check_interrupts(case):
    X, y = _int_data(case)
    model = _int_model(case)
    interrupted = run_interrupted(model, case, X, y)
    nb = -(-case["n"] // case["batch"])
    if case["trigger"] in ("epoch_end", "chunk") and not interrupted:
        # a chunk beyond the fit's last one never fires
        if case["trigger"] == "epoch_end" or counters(model).step < case["epochs"] * nb:
            raise Hole(f"the Ctrl-C ({case['trigger']}) did not propagate out of fit")
    require(all_finite(model), "after the Ctrl-C the model holds non-finite values")
    steps = counters(model).step
    require(counters(model).t == steps, f"inconsistent counters after the Ctrl-C: step "
                                        f"{steps}, t {counters(model).t}")
    ref = reference_after_steps(case, steps)
    require(same_state({k: v for k, v in state_of(model).items() if k != "epochs_run"},
                       {k: v for k, v in state_of(ref).items() if k != "epochs_run"}),
            f"after a Ctrl-C ({case['trigger']}) the model is not the model of its {steps} "
            f"training steps (backend {case['backend']})")
    if interrupted and case["trigger"] == "epoch_end":
        done = (case["at"] % case["epochs"] + 1) * nb
        require(steps == done, f"the Ctrl-C after epoch {case['at'] % case['epochs'] + 1} "
                               f"kept {steps} steps, not the {done} trained")
    if interrupted and case["trigger"] == "chunk":
        done = _steps_after_chunks(case, model, case["at"] + 1)
        require(steps == done, f"the Ctrl-C during chunk {case['at'] + 1} of batches kept "
                               f"{steps} steps, not the {done} of the chunks completed")
    if interrupted and model.history is None:
        # a press before the fit began (its argument checks): nothing was trained
        require(steps == 0, "model.history is None after an interrupted fit that trained")
    elif interrupted:
        hist = model.history.history.get("loss", [])
        epochs_run = counters(model).epochs_run
        require(len(hist) == epochs_run,
                f"history holds {len(hist)} epochs, the model ran {epochs_run}")
        require(epochs_run <= steps // nb, "epochs_run counts an unfinished epoch")


@st.composite
def resume_cases(draw):
    return {"backend": draw(st.sampled_from(CPU)),
            "epochs": draw(st.integers(2, 5)),
            "stop_after": draw(st.integers(0, 4)),
            "n": draw(st.integers(8, 40)),
            "batch": draw(st.integers(1, 8)),
            "multitask": draw(st.booleans()),
            "dropout": draw(st.sampled_from([0.0, 0.3])),
            "seed": draw(st.integers(0, 2 ** 16)),
            "trigger": "epoch_end", "at": 0, "delay": 0.0, "verbose": 0}


def check_resume(case, tmp):
    """fit with BackupAndRestore, Ctrl-C after epoch `stop_after`, fit again: bitwise the
    weights of the uninterrupted fit."""
    X, y = _int_data(case)
    full = _int_model(case)
    full.fit(X, y, epochs=case["epochs"], batch_size=case["batch"], verbose=0)
    backup = os.path.join(tmp, f"b{case['seed']}-{case['epochs']}-{case['stop_after']}")
    model = _int_model(case)
    stop = case["stop_after"] % case["epochs"]

    class CtrlC(fr.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == stop:
                _thread.interrupt_main()
    try:
        try:
            model.fit(X, y, epochs=case["epochs"], batch_size=case["batch"], verbose=0,
                      callbacks=[fr.BackupAndRestore(backup), CtrlC()])
        finally:
            _absorb()
    except KeyboardInterrupt:
        pass
    again = _int_model(case)
    again.fit(X, y, epochs=case["epochs"], batch_size=case["batch"], verbose=0,
              callbacks=[fr.BackupAndRestore(backup)])
    require(same_state(state_of(again), state_of(full)),
            "a fit resumed from BackupAndRestore differs from the uninterrupted fit")
    require(len(again.history.history["loss"]) == case["epochs"],
            "the resumed history does not hold every epoch")


# ================================================================ threads
@st.composite
def thread_cases(draw):
    def one():
        return {"backend": draw(st.sampled_from(CPU)),
                "width": draw(st.integers(2, 24)),
                "act": draw(st.sampled_from(ACTIVATIONS)),
                "dropout": draw(st.sampled_from([0.0, 0.2])),
                "n": draw(st.integers(64, 300)),      # batches of at most the rows: the
                "batch": draw(st.integers(4, 64)),    # thread class alone
                "epochs": draw(st.integers(1, 3)),
                "seed": draw(st.integers(0, 2 ** 16))}
    return {"a": one(), "b": one()}


def _thread_fit(spec):
    X, y = data(spec["seed"], spec["n"], 4)
    model = fr.Sequential([fr.Dense(spec["width"], spec["act"], dropout=spec["dropout"]),
                           fr.Dense(1)], input_dim=4, seed=spec["seed"])
    model.compile(optimizer=fr.Adam(1e-2), backend=spec["backend"])
    model.fit(X, y, epochs=spec["epochs"], batch_size=spec["batch"], verbose=0)
    return model.get_weights()


def blas_threads():
    from threadpoolctl import threadpool_info
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")


def check_threads(case):
    before = blas_threads()
    seq = [_thread_fit(case["a"]), _thread_fit(case["b"])]
    require(blas_threads() == before, "a fit left the BLAS thread pools changed")
    out = [None, None]
    errors = []

    def run(k, spec):
        try:
            out[k] = _thread_fit(spec)
        except BaseException as exc:    # reported below
            errors.append(exc)
    ts = [threading.Thread(target=run, args=(k, case[key])) for k, key in enumerate("ab")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    require(not errors, f"a fit in a thread failed: {errors and errors[0]!r}")
    require(blas_threads() == before, f"two fits in two threads left the BLAS pools at "
                                      f"{blas_threads()}, were {before}")
    for k in range(2):
        require(all(np.array_equal(u, v) for u, v in zip(seq[k], out[k])),
                "a fit run beside another in a thread differs from the same fit run alone")
    after = _thread_fit(case["a"])
    require(all(np.array_equal(u, v) for u, v in zip(seq[0], after)),
            "the same seeded fit differs after two concurrent fits")


# ================================================================ memory
@st.composite
def memory_cases(draw):
    return {"backend": draw(st.sampled_from(CPU)),
            "what": draw(st.sampled_from(["fit", "predict", "evaluate", "mc"])),
            "layout": draw(st.sampled_from(["c32", "f64", "fortran32", "strided32"])),
            "rows": draw(st.integers(20000, 40000)),
            "features": draw(st.integers(96, 160)),
            "mc": draw(st.integers(30000, 80000)),
            "seed": draw(st.integers(0, 2 ** 16))}


def _traced_peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_memory(case):
    rng = np.random.default_rng(case["seed"])
    n, d = case["rows"], case["features"]
    X32 = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((n, 1)).astype(np.float32)
    X = {"c32": X32, "f64": X32.astype(np.float64), "fortran32": np.asfortranarray(X32),
         "strided32": np.repeat(X32, 2, axis=1)[:, ::2]}[case["layout"]]
    what = case["what"]
    if what == "mc":
        width = 256
        model = fr.Sequential([fr.Dense(width, "relu", dropout=0.2), fr.Dense(1)],
                              input_dim=d, seed=case["seed"])
        model.compile(backend=case["backend"])
        x1 = np.ascontiguousarray(X32[:1])
        model.predict(x1, mc_samples=2, seed=0)   # warm
        one_pass = _traced_peak(lambda: model.predict(x1, mc_samples=8192, seed=0))
        peak = _traced_peak(lambda: model.predict(x1, mc_samples=case["mc"], seed=0))
        bound = one_pass * 5 // 4 + (1 << 20)
        require(peak <= bound, f"predict(mc_samples={case['mc']}) peaked at "
                               f"{peak / 2 ** 20:.1f} MiB, over the {bound / 2 ** 20:.1f} MiB "
                               f"of a pass of 8192 stacked rows (+25%)")
        return
    model = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=d, seed=case["seed"])
    model.compile(optimizer=fr.SGD(1e-3), backend=case["backend"])
    model.fit(X32[:64], y[:64], epochs=1, batch_size=32, verbose=0)     # warm
    x_bytes = n * d * 4
    if what == "fit":
        if case["layout"] != "c32":
            return          # one converted copy is needed (and allowed) for training
        peak = _traced_peak(lambda: model.fit(X, y, epochs=1, batch_size=256, verbose=0))
    elif what == "predict":
        peak = _traced_peak(lambda: model.predict(X))
    else:
        peak = _traced_peak(lambda: model.evaluate(X, y))
    bound = x_bytes // 2 + 48 * n + (2 << 20)
    require(peak <= bound, f"{what} on a {case['layout']} X of {x_bytes / 2 ** 20:.1f} MiB "
                           f"peaked at {peak / 2 ** 20:.1f} MiB (bound {bound / 2 ** 20:.1f})")


# ================================================================ the table
CATEGORIES = {
    "nan": (nan_cases(), check_nan, False),
    "divergence": (divergence_cases(), check_divergence, False),
    "arguments": (argument_cases(), check_arguments, False),
    "api_misuse": (api_misuse_cases(), check_api_misuse, False),
    "files": (file_cases(), check_files, True),
    "save": (save_cases(), check_save, True),
    "interrupts": (interrupt_cases(), check_interrupts, False),
    "resume": (resume_cases(), check_resume, True),
    "threads": (thread_cases(), check_threads, False),
    "memory": (memory_cases(), check_memory, False),
}
