"""Backend names resolved in one place: compile(backend=...) or FASTREG_BACKEND.

Each backend is a module of fastreg.kernels implementing the kernel contract
(kernels/contract.py) plus train_epoch / forward_inference. A backend whose build or hardware
is missing raises BackendUnavailable with one sentence saying how to get it.

The default is the Cython backend when its extension was built at install (compiled ahead of
time: the first epoch of a fresh process runs at full speed), else the Numba backend (which
compiles its kernels on first use and caches them on disk).
"""
import importlib
import os

PREFERRED_DEFAULTS = ("cython", "numba")
MODULES = {
    "numpy": "fastreg.kernels.reference",
    "numba": "fastreg.kernels.cpu",
    "cython": "fastreg.kernels.cython",
    "cuda": "fastreg.kernels.cuda",
}
HOW_TO_GET = {
    "numba": "install numba (pip install numba)",
    "cython": "reinstall fastreg with a C compiler and Cython available (pip install -e .)",
    "cuda": "install the CUDA extra (pip install \"fastreg[cuda]\") on a machine with an "
            "NVIDIA GPU",
}


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here."""


def default_name():
    """The first of PREFERRED_DEFAULTS that can run here (numba as the last word: its
    error then says how to get it)."""
    for name in PREFERRED_DEFAULTS:
        try:
            resolve(name)
            return name
        except BackendUnavailable:
            continue
    return PREFERRED_DEFAULTS[-1]


def name_of(backend=None):
    """The backend name to use: the argument, else $FASTREG_BACKEND, else default_name()."""
    name = backend if backend is not None else os.environ.get("FASTREG_BACKEND") or \
        default_name()
    if not isinstance(name, str) or name.lower() not in MODULES:
        source = "backend" if backend is not None else "FASTREG_BACKEND"
        raise ValueError(f"unknown {source} {name!r}; choose one of {sorted(MODULES)}")
    return name.lower()


def resolve(backend=None):
    """The kernel module of a backend, or BackendUnavailable with how to get it."""
    name = name_of(backend)
    try:
        module = importlib.import_module(MODULES[name])
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is not available: {exc}. "
                                 f"To get it, {HOW_TO_GET.get(name, 'reinstall fastreg')}.") \
            from exc
    check = getattr(module, "available", None)
    if check is not None:
        ok, reason = check()
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return module


def availability():
    """{name: (available, reason)} for every backend, without raising."""
    out = {}
    for name in MODULES:
        try:
            resolve(name)
            out[name] = (True, "")
        except BackendUnavailable as exc:
            out[name] = (False, str(exc))
    return out
