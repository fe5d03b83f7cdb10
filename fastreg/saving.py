"""Persistence: model files (.npz archives of a JSON config and .npy arrays, read without
pickle through fastreg/modelfile.py), the arrays of a network's parts, weights files,
BackupAndRestore's backups, and the registry of model formats.

Each front end registers its format (Sequential "fastreg-model", MultiTask
"fastreg-multitask") with a loader; load_model opens a file and dispatches on the config's
"format": no front end imports another.

Arrays of a part (Sequential: the one part, no prefix; MultiTask: part k under "p<k>_"), per
dense block i of the part: W<i>, b<i>, and with BatchNorm bn<i> (2, O) gamma; beta and
bnstat<i> (2, O) running mean; variance; with optimizer state, mW<i>, vW<i>, mb<i>, vb<i>
(and mbn<i>, vbn<i> with BatchNorm), empty arrays for moments the optimizer does not keep.

Loading never trusts the file: every member the config implies is named and its .npy header
checked (shape, real dtype, size) before any data is read or the model's arrays allocated,
then every value is validated (finite; second moments and BatchNorm variances >= 0;
counters integers in range); only then is the model built and its state installed, in one
block a Ctrl-C cannot cut (fastreg/interrupts.py). Anything else is
ValueError("'<path>' is not a valid fastreg model file: <what>").
"""
import json
import os

import numpy as np

from . import backend as backends
from . import interrupts
from . import modelfile
from .kernels import contract
from .modelfile import InvalidModelFile
from .validation import check_width

_LOADERS = {}
# What a damaged config or member makes the loaders raise (MemoryError is not among them: a
# valid model too large for this machine is not the file's fault).
LOAD_ERRORS = (InvalidModelFile, KeyError, TypeError, ValueError, AttributeError,
               OverflowError, RecursionError, IndexError)
COUNTER_LIMITS = {"step": 2 ** 63, "t": 2 ** 63, "epochs_run": 2 ** 63, "mc_step": 2 ** 32}


def register(format_name, loader):
    """load_model(path) calls loader(cfg, archive, backend) for files of this format
    (archive: a modelfile.Archive, read through load_state)."""
    _LOADERS[format_name] = loader


def load_model(path, backend=None):
    """Load a model written by Sequential.save or MultiTask.save, without pickle.

    The saved backend is used when it is available here, else `backend` or the default. The
    file is validated before anything the size of the model is allocated (module docstring).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    with modelfile.Archive(path) as arc:
        try:
            cfg = arc.json("config")
            loader = _LOADERS.get(cfg.get("format"))
            if loader is None:
                raise InvalidModelFile("not a fastreg model")
            return loader(cfg, arc, backend)
        except LOAD_ERRORS as exc:
            raise ValueError(f"{path!r} is not a valid fastreg model file: {exc}") from exc


def check_version(cfg, version, what="format"):
    found = cfg.get("version", 0)
    if isinstance(found, bool) or not isinstance(found, int) or found < 0:
        raise InvalidModelFile(f"its {what} version is {found!r}")
    if found > version:
        raise InvalidModelFile(f"written by a newer fastreg ({what} {found})")


def config_list(value, what):
    """A config's list of layer (or head) configs, each a JSON object."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidModelFile(f"its {what} is not a list of configs")
    return value


def backend_for_loading(saved, backend=None):
    """`backend` if given, else the saved backend when it is available here, else None (the
    default backend: e.g. a model trained on a GPU, loaded on a laptop)."""
    if backend is not None:
        return backend
    try:
        backends.resolve(saved)
    except (backends.BackendUnavailable, ValueError, TypeError):
        return None
    return saved


# ---------------------------------------------------------------- counters
def counters_config(network):
    c = network.counters
    return {"step": c.step, "t": c.t, "epochs_run": c.epochs_run, "mc_step": c.mc_step}


def read_counters(cfg):
    """{counter: value} of a config, checked: integers in range (mc_step is absent in files
    of earlier versions: 0)."""
    return {key: modelfile.check_counter(cfg, key, high, default=0 if key == "mc_step"
                                         else None)
            for key, high in COUNTER_LIMITS.items()}


def input_columns_config(network):
    """{"input_columns": [...]} for an input-pruned network (prune(inputs=True)), else {}:
    files of unpruned models stay as they were."""
    cols = network.input_columns
    return {} if cols is None else {"input_columns": [int(c) for c in cols]}


def read_input_columns(cfg):
    """The saved input_columns (strictly increasing integers >= 0, one per input), or None."""
    cols = cfg.get("input_columns")
    if cols is None:
        return None
    dim = cfg.get("input_dim")
    if not isinstance(cols, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                             for c in cols) \
            or any(c < 0 for c in cols) or any(a >= b for a, b in zip(cols, cols[1:])) \
            or len(cols) != dim:
        raise modelfile.InvalidModelFile(
            f"input_columns must be {dim} increasing column indices >= 0, got {cols!r:.200}")
    return np.asarray(cols, np.int64)


def set_input_columns(network, columns):
    network.input_columns = columns


def set_counters(network, counters):
    with interrupts.deferred():
        for key, value in counters.items():
            setattr(network.counters, key, value)


# ---------------------------------------------------------------- the arrays of a part
_MOMENTS = (("mW", "W", "m"), ("vW", "W", "v"), ("mb", "b", "m"), ("vb", "b", "v"),
            ("mbn", "gb", "m"), ("vbn", "gb", "v"))


def _empty_moment(kind):
    return np.zeros((0,) * (1 if kind == "b" else 2))


def _prefix(network, p):
    return "" if len(network.parts) == 1 else f"p{p}_"


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


def network_members(config, network):
    """The members of a network's file: the config as JSON, every part's arrays."""
    arrays = {"config": np.array(json.dumps(config))}
    for p in range(len(network.parts)):
        prefix = _prefix(network, p)
        arrays.update({prefix + k: a for k, a in part_arrays(network, p).items()})
    return arrays


def save_network(path, config, network):
    """Write a network's file atomically (modelfile.write_npz: a new file gets 0o666 less the
    umask, an existing one keeps its mode, a symlink is written through)."""
    modelfile.write_npz(path, network_members(config, network))


# ---------------------------------------------------------------- reading a network's state
def expected_members(network, input_dim, optimizer, moments):
    """What a file of this network holds for input_dim, from the config alone (nothing
    allocated): {member: (shape, (buffer, kind, layer), check)}; buffer "params", "stats",
    "m" or "v"; check "finite", "nonneg" (finite and >= 0) or "stats" (running mean
    finite, variance finite and >= 0). moments: whether the optimizer's are in the file."""
    out = {}
    shapes = network.layer_shapes(input_dim)
    first = 0
    for p, part in enumerate(network.parts):
        prefix = _prefix(network, p)
        for i, blk in enumerate(part.blocks):
            l, s = first + i, shapes[first + i]
            tensors = {"W": (s.fan_in, s.units), "b": (s.units,) if s.bias else (0,)}
            out[f"{prefix}W{i}"] = (tensors["W"], ("params", "W", l), "finite")
            out[f"{prefix}b{i}"] = (tensors["b"], ("params", "b", l), "finite")
            if blk.bn is not None:
                tensors["gb"] = (2, s.units)
                out[f"{prefix}bn{i}"] = ((2, s.units), ("params", "gb", l), "finite")
                out[f"{prefix}bnstat{i}"] = ((2, s.units), ("stats", None, l), "stats")
            if moments:
                for name, kind, which in _MOMENTS:
                    if kind in tensors:
                        kept = which in optimizer.moments
                        shape = tensors[kind] if kept else _empty_moment(kind).shape
                        out[f"{prefix}{name}{i}"] = (shape, (which, kind, l),
                                                     "nonneg" if which == "v" else "finite")
        first += len(part.blocks)
    return out


def stage_state(network, arc, input_dim, optimizer):
    """Every array of the network's file in archive `arc`, checked against the config (every
    header first, before any data is read), then read and validated; returns the staged
    state for install_state. Raises InvalidModelFile; changes nothing."""
    moments = _prefix(network, 0) + "mW0" in arc
    if moments and optimizer is None:
        raise InvalidModelFile("it holds optimizer state but no optimizer (compile)")
    plan = expected_members(network, input_dim, optimizer, moments)
    for name, (shape, _, _) in plan.items():
        got, dtype, _ = arc.header(name)
        if got != shape:
            raise InvalidModelFile(f"member {name!r} has shape {got}, expected {shape} from "
                                   f"its config")
        if dtype.kind not in "fiu":
            raise InvalidModelFile(f"member {name!r} has dtype {dtype}: model arrays are "
                                   f"real numbers")
    staged = []
    for name, (shape, target, check) in plan.items():
        raw = arc.read(name, shape)
        with np.errstate(over="ignore", invalid="ignore"):    # an overflow is refused below
            arr = np.ascontiguousarray(raw, dtype=network.dtype)
        if check == "stats":
            modelfile.check_values(name, arr)
            modelfile.check_values(name + " (running variance)", arr[contract.BN_VAR],
                                   nonnegative=True)
        else:
            modelfile.check_values(name, arr, nonnegative=check == "nonneg")
        staged.append((target, arr))
    return {"moments": moments, "arrays": staged}


def install_state(network, staged, optimizer):
    """Put staged arrays into the built network, in place (a Ctrl-C waits for the end)."""
    store = network.store
    with interrupts.deferred():
        if staged["moments"]:
            network.moments_ready = False
            network.ensure_optimizer_state(optimizer)
        else:
            network.reset_optimizer_state()
        for (buffer, kind, l), arr in staged["arrays"]:
            if buffer == "stats":
                store.running_stats(l)[...] = arr
            elif buffer == "params":
                store.tensor(kind, l)[...] = arr
            elif getattr(store, buffer).size:       # a moment the optimizer keeps
                store.tensor(kind, l, getattr(store, buffer))[...] = arr


def load_state(model, arc, input_dim):
    """Build `model` for input_dim and install its arrays from archive `arc`, every member
    checked first (stage_state): a damaged file allocates nothing the size of the model."""
    input_dim = check_width("input_dim", input_dim)
    staged = stage_state(model._network, arc, input_dim, model.optimizer)
    model.build(input_dim)
    install_state(model._network, staged, model.optimizer)


# ---------------------------------------------------------------- weights files
WEIGHTS_FORMAT = "fastreg-weights"


def save_weights(model, path):
    """get_weights() alone, atomically (model.load_weights reads it)."""
    weights = model.get_weights()
    arrays = {"config": np.array(json.dumps({"format": WEIGHTS_FORMAT, "version": 1,
                                             "count": len(weights)}))}
    arrays.update({f"w{i}": w for i, w in enumerate(weights)})
    modelfile.write_npz(path, arrays)


def load_weights(model, path):
    """set_weights from a file written by save_weights (headers checked before reading)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    if not model.built:
        raise ValueError("the model is not built yet: pass input_dim or call fit/build "
                         "before load_weights")
    current = model._network.weight_list()
    with modelfile.Archive(path) as arc:
        try:
            cfg = arc.json("config")
            if cfg.get("format") != WEIGHTS_FORMAT:
                raise InvalidModelFile("not a fastreg weights file (write it with "
                                       "model.save_weights)")
            if cfg.get("count") != len(current):
                raise InvalidModelFile(f"it holds {cfg.get('count')!r} arrays, the model has "
                                       f"{len(current)}")
            for i, cur in enumerate(current):
                got, dtype, _ = arc.header(f"w{i}")
                if got != cur.shape or dtype.kind not in "fiu":
                    raise InvalidModelFile(f"array {i} has shape {got} and dtype {dtype}, the "
                                           f"model's has shape {cur.shape}")
            weights = [arc.read(f"w{i}", cur.shape) for i, cur in enumerate(current)]
        except LOAD_ERRORS as exc:
            raise ValueError(f"{path!r} is not a valid fastreg weights file: {exc}") from exc
    model.set_weights(weights)


# ---------------------------------------------------------------- BackupAndRestore's files
# The config keys that a backup of the same model may differ in: what training changes.
_PROGRESS_KEYS = ("compile",) + tuple(COUNTER_LIMITS)


def write_backup(model, path, epochs_done, history):
    """BackupAndRestore's file: the model's file members plus the fit's progress."""
    arrays = network_members(model.get_config(), model._network)
    arrays["backup"] = np.array(json.dumps({"epochs_done": int(epochs_done),
                                            "history": history}))
    modelfile.write_npz(path, arrays)


def read_backup(model, path):
    """Restore a backup written by write_backup into `model` (the same model: config
    compared), all of it or nothing; returns (epochs_done, history)."""
    path = os.fspath(path)
    with modelfile.Archive(path) as arc:
        try:
            cfg = arc.json("config")
            progress = arc.json("backup")
            mine = model.get_config()
            for key in sorted(set(cfg) | set(mine)):
                if key not in _PROGRESS_KEYS and cfg.get(key) != mine.get(key):
                    raise InvalidModelFile(f"it was written by another model (its {key} "
                                           f"differs)")
            theirs, ours = cfg.get("compile") or {}, mine.get("compile") or {}
            for key in ("loss", "optimizer"):
                if theirs.get(key) != ours.get(key):
                    raise InvalidModelFile(f"it was written by another model (its {key} "
                                           f"differs)")
            done = modelfile.check_counter(progress, "epochs_done", 2 ** 63)
            history = progress.get("history")
            if not isinstance(history, dict) or not all(
                    isinstance(v, list) and len(v) == done
                    and all(isinstance(x, (int, float)) for x in v) for v in history.values()):
                raise InvalidModelFile("its history does not hold one number per epoch done")
            counters = read_counters(cfg)
            staged = stage_state(model._network, arc, model.input_dim, model.optimizer)
        except LOAD_ERRORS as exc:
            raise ValueError(f"{path!r} is not a valid fastreg backup of this model: "
                             f"{exc}") from exc
    with interrupts.deferred():
        install_state(model._network, staged, model.optimizer)
        set_counters(model._network, counters)
    return done, history
