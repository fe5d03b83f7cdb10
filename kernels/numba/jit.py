"""How the Numba backend compiles: the decorator flags, compile-time specialization, and the
cache stamp of its entry points.

- `kernel` (internal functions) compiles without a disk cache: internal functions only run
  inside an entry point, whose cached machine code already contains them.
- `entry` marks the functions Python calls (kernels/numba/__init__.py): cache=True, and the
  cache entry is tied to the sources of the whole backend (SOURCE_STAMP), because Numba
  checks only the entry point's own file: an edit of epilogue.py alone would otherwise
  reuse a stale epoch.
- `specialized(loop)` makes a ladder that calls an elementwise loop with a code
  (activation, update variant) as a compile-time constant, so each copy is branch-free and
  vectorises; inside, `by_code` tables (the activations' f and f') pick the code's entry at
  typing time, so a copy types only its own activation. The ladder is generated at compile
  time from the codes a network uses, passed as a `uses` tuple (1 where a code is used,
  None elsewhere): a network compiles only its own activations and update variants, not
  every entry of the contract's tables.
- Optional features are None arguments (BatchNorm arrays, noise words, input transforms):
  Numba prunes a branch on `x is None` before typing, so a network without BatchNorm never
  compiles the BatchNorm kernels.

``fastmath`` stays off: it lets LLVM reassociate sums, which would break bit-for-bit
determinism across thread counts and parity with the reference.
"""
import hashlib
import inspect
import os
import warnings

from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

FLAGS = dict(nogil=True, fastmath=False)
kernel = njit(**FLAGS)
kernel_inline = njit(inline="always", **FLAGS)
kernel_parallel = njit(parallel=True, **FLAGS)
ENTRY_FLAGS = dict(FLAGS, cache=True)


def _source_stamp():
    """A hash of every source the compiled code depends on: this package and the contract."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))
    files.append(os.path.join(os.path.dirname(here), "contract.py"))
    digest = hashlib.sha1()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return int(digest.hexdigest()[:15], 16)


SOURCE_STAMP = _source_stamp()


def uses_of(codes, size):
    """The `uses` tuple of a set of codes: 1 at each code in `codes`, None elsewhere."""
    codes = {int(c) for c in codes}
    return tuple(1 if c in codes else None for c in range(size))


# Numba's SSA pass warns (NumbaIRAssumptionWarning "variable ... is not in scope") when it
# inlines a typed overload whose body branches, as a by_code entry such as relu's does inside
# a `specialized` ladder: a pedantic bookkeeping check (the variable is defined, the IR is
# right; the backends' tests compare every entry with the reference). Silenced for the
# entries' own variables only (the tables' functions are named _f_<name> / _df_<name>).
warnings.filterwarnings("ignore", message=r"variable '_d?f_\w+",
                        category=NumbaIRAssumptionWarning)


def by_code(stub, table):
    """Make `stub(x, code, p)` call table[code] for a compile-time constant code (the
    literal a `specialized` ladder passes, or a contract constant): only that entry is typed
    and compiled, so the size of the table costs nothing. The entries are plain Python
    functions with the stub's parameter names (numba compiles the one it picks as the
    stub's inlined implementation). A code that is not a constant does not compile: there
    is no runtime dispatch."""
    def pick(code):
        if isinstance(code, types.IntegerLiteral):
            return table.get(code.literal_value)
        return None

    params = ", ".join(inspect.signature(stub).parameters)   # numba wants the stub's names
    scope = {"PICK": pick}
    exec(f"def typer({params}):\n    return PICK({params.split(', ')[1]})", scope)
    overload(stub, prefer_literal=True, inline="always")(scope["typer"])
    return stub


def specialized(loop, returns=False):
    """ladder(uses, code, *args) -> loop(*args, CODE), CODE a compile-time constant, for the
    codes marked in `uses`; a code not marked does nothing (the caller never passes one).
    With returns=True the ladder returns the loop's float value (NaN for a code not
    marked)."""
    def ladder(uses, code, *args):
        raise NotImplementedError("a Numba ladder runs in compiled code only")

    @overload(ladder)
    def _ladder(uses, code, *args):
        marked = [c for c, t in enumerate(uses.types) if not isinstance(t, types.NoneType)]
        call = ", ".join(f"args[{k}]" for k in range(len(args)))
        src = ["def impl(uses, code, *args):"]
        for c in marked:
            loop_call = f"LOOP({call}{', ' if call else ''}{c})"
            src += [f"    if code == {c}:"] + (
                [f"        return {loop_call}"] if returns
                else [f"        {loop_call}", "        return"])
        src.append("    return NAN" if returns else "    return")
        scope = {"LOOP": loop, "NAN": float("nan")}
        exec("\n".join(src), scope)    # the ladder of this network's codes, typed now
        return scope["impl"]

    ladder.__name__ = f"specialized_{loop.__name__}"
    return ladder
