"""Test session setup.

The CUDA tests run on numba-cuda's simulator unless a GPU is present: the switch must be set
before numba is first imported, so it lives here (conftest is imported before test modules).
FASTREG_TEST_GPU=1 forces the real device.
"""
import os
import shutil

if os.environ.get("FASTREG_TEST_GPU") != "1" and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    try:
        import cudasim
        cudasim.install()
    except ImportError:     # numba-cuda not installed: the CUDA tests skip themselves
        pass
