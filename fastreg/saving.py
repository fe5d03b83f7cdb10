"""Persistence: model files (.npz archives of a JSON config and .npy arrays, read without
pickle), the arrays of a network's parts, and the registry of model formats.

Each front end registers its format (Sequential "fastreg-model", MultiTask
"fastreg-multitask") with a loader; load_model reads a file and dispatches on the config's
"format": no front end imports another.

Arrays of a part (Sequential: the one part, no prefix; MultiTask: part k under "p<k>_"), per
dense block i of the part: W<i>, b<i>, and with BatchNorm bn<i> (2, O) gamma; beta and
bnstat<i> (2, O) running mean; variance; with optimizer state, mW<i>, vW<i>, mb<i>, vb<i>
(and mbn<i>, vbn<i> with BatchNorm), empty arrays for moments the optimizer does not keep.
"""
import json
import os
import tempfile

import numpy as np

from . import backend as backends
from .kernels import contract as C

_LOADERS = {}


def register(format_name, loader):
    """load_model(path) calls loader(cfg, files, backend) for files of this format."""
    _LOADERS[format_name] = loader


def load_model(path, backend=None):
    """Load a model written by Sequential.save or MultiTask.save, without pickle.

    The saved backend is used when it is available here, else `backend` or the default.
    """
    cfg, files = read_model_file(path)
    path = os.fspath(path)
    try:
        loader = _LOADERS.get(cfg.get("format"))
        if loader is None:
            raise ValueError("not a fastreg model")
        return loader(cfg, files, backend)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} is not a valid fastreg model file: {exc}") from exc


def check_version(cfg, version, what="format"):
    if cfg.get("version", 0) > version:
        raise ValueError(f"written by a newer fastreg ({what} {cfg['version']})")


def backend_for_loading(saved, backend=None):
    """`backend` if given, else the saved backend when it is available here, else None (the
    default backend: e.g. a model trained on a GPU, loaded on a laptop)."""
    if backend is not None:
        return backend
    try:
        backends.resolve(saved)
    except (backends.BackendUnavailable, ValueError):
        return None
    return saved


# ---------------------------------------------------------------- files
def write_npz(path, arrays):
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


def read_model_file(path):
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


def save_network(path, config, network):
    """Write a network's file: the config as JSON, every part's arrays (module docstring)."""
    arrays = {"config": np.array(json.dumps(config))}
    single = len(network.parts) == 1
    for p in range(len(network.parts)):
        prefix = "" if single else f"p{p}_"
        arrays.update({prefix + k: a for k, a in part_arrays(network, p).items()})
    write_npz(path, arrays)


def counters_config(network):
    c = network.counters
    return {"step": c.step, "t": c.t, "epochs_run": c.epochs_run, "mc_step": c.mc_step}


def load_counters(network, cfg):
    c = network.counters
    c.step, c.t, c.epochs_run = int(cfg["step"]), int(cfg["t"]), int(cfg["epochs_run"])
    c.mc_step = int(cfg.get("mc_step", 0))     # absent in files of earlier versions


# ---------------------------------------------------------------- the arrays of a part
_MOMENTS = (("mW", "W", "m"), ("vW", "W", "v"), ("mb", "b", "m"), ("vb", "b", "v"),
            ("mbn", "gb", "m"), ("vbn", "gb", "v"))


def _empty_moment(kind):
    return np.zeros((0,) * (1 if kind == "b" else 2))


def part_arrays(network, p):
    """Part p's members (module docstring), by the part's own block numbers."""
    store = network.store
    arrays = {}
    if store is None:
        return arrays
    first, end = network.part_ranges()[p]
    for i, l in enumerate(range(first, end)):
        arrays[f"W{i}"], arrays[f"b{i}"] = store.tensor("W", l), store.tensor("b", l)
        if network.blocks[l].bn is not None:
            arrays[f"bn{i}"], arrays[f"bnstat{i}"] = (store.tensor("gb", l),
                                                      store.running_stats(l))
    if network.moments_ready:
        for name, kind, which in _MOMENTS:
            flat = getattr(store, which)
            for i, l in enumerate(range(first, end)):
                if kind == "gb" and network.blocks[l].bn is None:
                    continue
                arrays[f"{name}{i}"] = (store.tensor(kind, l, flat) if flat.size
                                        else _empty_moment(kind))
    return arrays


def load_part_arrays(network, p, files):
    """Part p's weight list (Keras order) from its members, for the network's
    all-or-nothing assignment (shapes checked there; BatchNorm's here: ValueError, or
    KeyError for a missing member)."""
    store = network.store
    first, end = network.part_ranges()[p]
    weights = []
    for i, l in enumerate(range(first, end)):
        weights += [files[f"W{i}"], files[f"b{i}"]]
        if network.blocks[l].bn is not None:
            gb, st = files[f"bn{i}"], files[f"bnstat{i}"]
            want = store.tensor("gb", l).shape
            if gb.shape != want or st.shape != want:
                raise ValueError(f"BatchNorm arrays of layer {i} have shapes {gb.shape}, "
                                 f"{st.shape}, expected {want}")
            weights += [gb[C.BN_GAMMA], gb[C.BN_BETA], st[C.BN_MEAN], st[C.BN_VAR]]
    return weights


def load_part_moments(network, p, files, optimizer):
    """Part p's optimizer moments, when the file has them (mW0 present)."""
    if "mW0" not in files:
        return
    network.ensure_optimizer_state(optimizer)
    store = network.store
    first, end = network.part_ranges()[p]
    for name, kind, which in _MOMENTS:
        flat = getattr(store, which)
        for i, l in enumerate(range(first, end)):
            if kind == "gb" and network.blocks[l].bn is None:
                continue
            src = files[f"{name}{i}"]
            if not flat.size:
                if src.size:
                    raise ValueError(f"optimizer state {name}{i} has shape {src.shape}, "
                                     f"but the optimizer keeps no {which!r} moment")
                continue
            dst = store.tensor(kind, l, flat)
            if src.shape != dst.shape:
                raise ValueError(f"optimizer state {name}{i} has shape {src.shape}, "
                                 f"expected {dst.shape}")
            dst[...] = src
