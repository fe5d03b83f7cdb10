"""Model files: .npz archives (a JSON config member plus .npy arrays), read without pickle and
with bounded work, written atomically.

Reading never trusts the file: the config member's declared size is checked before it is
read and its JSON nesting is bounded; an array member is read only when the format names it
(members the format does not name are never decompressed), and only after its .npy header
(declared shape and dtype, read alone) matched what the config implies and the archive's
own record of the member's size matched the header. So a file can only make fastreg allocate
what its config declares, and only when its arrays agree; every value is then validated
(finite, real, second moments and variances >= 0, counters integers in range). A rejected
file raises ValueError("'<path>' is not a valid fastreg model file: <what>"), or "... is not
a readable fastreg model file ..." when it is not an archive at all.

Writing goes to a temporary file in the destination's directory, then os.replace: a reader
never sees half a file. The file gets the mode a plain open() would give it (0o666 less the
umask), or keeps the mode of the file it replaces; a symlink is written through (its target
is replaced, the link stays).
"""
import json
import os
import stat
import tempfile
import threading
import zipfile

import numpy as np

MAX_CONFIG_CHARS = 1 << 22      # 4 Mi characters of JSON: far more than any model's config
MAX_JSON_DEPTH = 64
_UMASK_LOCK = threading.Lock()


class InvalidModelFile(ValueError):
    """What is wrong with a model file (the caller prefixes the path)."""


# ---------------------------------------------------------------- reading
class Archive:
    """The members of a model archive, by name (without .npy), read on request."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            self.infos = {info.filename[:-4]: info for info in self.zip.infolist()
                          if info.filename.endswith(".npy")}
        except MemoryError:
            raise
        except Exception as exc:    # whatever a damaged archive makes zipfile raise
            raise ValueError(f"{path!r} is not a readable fastreg model file (corrupt or not "
                             f"an .npz archive): {exc}") from exc

    def close(self):
        self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, name):
        return name in self.infos

    def header(self, name):
        """(shape, dtype, data bytes) from member `name`'s .npy header alone."""
        info = self.infos.get(name)
        if info is None:
            raise InvalidModelFile(f"it has no member {name!r}")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise InvalidModelFile(f"member {name!r} has .npy version {version}")
                offset = f.tell()
        except (InvalidModelFile, MemoryError):
            raise
        except Exception as exc:    # a damaged member: zipfile, zlib or .npy errors
            raise InvalidModelFile(f"member {name!r} is not a readable .npy array "
                                   f"({type(exc).__name__}: {exc})") from exc
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise InvalidModelFile(f"member {name!r} has dtype {dtype}, not plain numbers")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if info.file_size != offset + nbytes:
            raise InvalidModelFile(f"member {name!r} declares shape {shape} ({nbytes} bytes of "
                                   f"data) but holds {info.file_size - offset}")
        return tuple(shape), dtype, nbytes

    def read(self, name, shape, what="real"):
        """Member `name`, which must have exactly `shape` and a real numeric dtype (what="real")
        or a unicode string (what="text"); its header is checked before any data is read."""
        got, dtype, _ = self.header(name)
        if what == "real" and dtype.kind not in "fiu":
            raise InvalidModelFile(f"member {name!r} has dtype {dtype}: model arrays are real "
                                   f"numbers")
        if what == "text" and dtype.kind != "U":
            raise InvalidModelFile(f"member {name!r} has dtype {dtype}, not text")
        if shape is not None and got != tuple(shape):
            raise InvalidModelFile(f"member {name!r} has shape {got}, expected {tuple(shape)}")
        try:
            with self.zip.open(self.infos[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except MemoryError:     # a valid member too large for this machine: not the file's fault
            raise
        except Exception as exc:    # a damaged member: zipfile, zlib or .npy errors
            raise InvalidModelFile(f"member {name!r} could not be read "
                                   f"({type(exc).__name__}: {exc})") from exc

    def json(self, name):
        """The JSON object stored in the 0-d text member `name` (size and nesting bounded)."""
        shape, dtype, _ = self.header(name)
        if dtype.kind != "U" or shape != ():
            raise InvalidModelFile(f"its {name} member is not a JSON text")
        if dtype.itemsize // 4 > MAX_CONFIG_CHARS:
            raise InvalidModelFile(f"its {name} member declares {dtype.itemsize // 4} "
                                   f"characters, more than the {MAX_CONFIG_CHARS} allowed")
        text = str(self.read(name, (), what="text"))
        try:
            value = json.loads(text)
        except RecursionError:
            raise InvalidModelFile(f"its {name} is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise InvalidModelFile(f"its {name} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise InvalidModelFile(f"its {name} is not a JSON object")
        check_depth(value, name)
        return value


def check_depth(value, what, limit=MAX_JSON_DEPTH):
    """Refuse JSON nested deeper than `limit` (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            raise InvalidModelFile(f"its {what} is nested deeper than {limit} levels")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def check_counter(cfg, key, high, default=None):
    """cfg[key]: an integer (not a bool) in [0, high)."""
    if key not in cfg and default is not None:
        return default
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < high:
        raise InvalidModelFile(f"its counter {key!r} is {v!r}, not an integer in [0, {high})")
    return v


def check_values(name, arr, nonnegative=False):
    """A model array's values: finite (and >= 0 where asked)."""
    if not np.isfinite(arr).all():
        raise InvalidModelFile(f"member {name!r} holds NaN or inf")
    if nonnegative and (arr < 0).any():
        raise InvalidModelFile(f"member {name!r} holds negative values (it must be >= 0)")


# ---------------------------------------------------------------- writing
def _umask():
    try:        # Linux: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_npz(path, arrays):
    """Write {name: array} as an .npz at `path` atomically (a temporary file in the same
    directory, then os.replace), with the mode open() would give a new file (or the mode of
    the file replaced), through a symlink to its target."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=".fastreg-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
