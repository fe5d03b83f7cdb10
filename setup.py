"""Only what pyproject.toml cannot say: the Cython extension built from kernels/cython/.

The extension ``fastreg.kernels.cython._kernels`` is kernels/cython/_kernels.pyx and the
.pxi rooms it includes. One of them, kernels/cython/contract.pxi, is written here before
cythonize from kernels/contract.py (loaded by path: it imports nothing from fastreg), by
kernels/cython/generate.py: the contract's constants and the activation dispatch are never
copied by hand.

The extensions are optional: if the compiler or Cython is missing the package still installs
(the pure-Python and Numba backends work) and ``backend="cython"`` explains how to build them.

Compiler flags: -O3, ``-ffp-contract=off`` (no fused multiply-adds, so the kernels round like
the Numba backend and the reference), never fast-math; OpenMP (``-fopenmp``) when the compiler
can build and link a test program with it, a serial build otherwise.
``FASTREG_CYTHON_NATIVE=1`` adds ``-march=native`` (a faster build that only runs on CPUs like
this one; it does not change any result). ``FASTREG_NO_OPENMP=1`` forces the serial build.
``FASTREG_NO_CYTHON_BUILD=1`` skips the extension.
"""
import os
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

EXT_NAME = "fastreg.kernels.cython._kernels"
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join("kernels", "cython", "_kernels.pyx")
CONTRACT_PXI = os.path.join(HERE, "kernels", "cython", "contract.pxi")
DIRECTIVES = dict(language_level=3, boundscheck=False, wraparound=False, cdivision=True,
                  initializedcheck=False, nonecheck=False)


def _warn(msg):
    print(f"fastreg: WARNING: {msg}", file=sys.stderr)


def _write_contract_pxi():
    """kernels/cython/contract.pxi from kernels/contract.py (rewritten only when it changes,
    so an unchanged contract does not force a rebuild)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_fastreg_cython_generate", os.path.join(HERE, "kernels", "cython", "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    contract = generate.load_by_path(os.path.join(HERE, "kernels", "contract.py"),
                                     "_fastreg_contract")
    text = generate.contract_pxi(contract)
    old = None
    if os.path.exists(CONTRACT_PXI):
        with open(CONTRACT_PXI) as f:
            old = f.read()
    if text != old:
        with open(CONTRACT_PXI, "w") as f:
            f.write(text)


def _extensions():
    """The Cython extension, cythonized; [] (and a warning) when that cannot be done."""
    if os.environ.get("FASTREG_NO_CYTHON_BUILD") == "1":
        _warn("FASTREG_NO_CYTHON_BUILD=1: the Cython kernels are not built")
        return []
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as exc:
        _warn(f"the Cython kernels are not built ({exc}); backend='cython' will be "
              f"unavailable. Install Cython and numpy, then reinstall.")
        return []
    ext = Extension(EXT_NAME, [SOURCE], include_dirs=[numpy.get_include()],
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    try:
        _write_contract_pxi()
        return cythonize([ext], compiler_directives=DIRECTIVES, quiet=True)
    except Exception as exc:  # a Cython error must not break the install of the rest
        _warn(f"cythonize failed ({exc}); backend='cython' will be unavailable")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that adds the right flags and never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            _warn(f"the Cython kernels could not be built ({exc}); backend='cython' will be "
                  f"unavailable. Install a C compiler, then reinstall.")

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            compile_args, link_args = ["/O2", "/fp:precise"], []
            if self._supports(["/openmp"], []):
                compile_args.append("/openmp")
        else:
            compile_args = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math",
                            "-fno-math-errno"]
            link_args = []
            if os.environ.get("FASTREG_CYTHON_NATIVE") == "1" and \
                    self._supports(["-march=native"], []):
                compile_args.append("-march=native")
            if os.environ.get("FASTREG_NO_OPENMP") == "1":
                _warn("FASTREG_NO_OPENMP=1: the Cython kernels are built serial")
            elif self._supports(["-fopenmp"], ["-fopenmp"]):
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                _warn("the C compiler does not support OpenMP: the Cython kernels run serial")
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(f"building {ext.name} failed ({exc}); backend='cython' will be unavailable")

    def _supports(self, compile_flags, link_flags):
        """Whether the compiler builds and links a tiny OpenMP-or-not program with flags."""
        tmp = tempfile.mkdtemp(prefix="fastreg-flags-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("#ifdef _OPENMP\n#include <omp.h>\n#endif\n"
                        "int main(void) {\n#ifdef _OPENMP\n return omp_get_max_threads() < 0;\n"
                        "#else\n return 0;\n#endif\n}\n")
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=compile_flags)
            self.compiler.link_executable(objs, "probe", output_dir=tmp,
                                          extra_postargs=link_flags)
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
