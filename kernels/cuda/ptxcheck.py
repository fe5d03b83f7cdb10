"""Compile every kernel of the CUDA backend to PTX without a GPU: typing and lowering are what
the numba-cuda simulator never exercises (it runs the kernels as Python).

    python -m fastreg.kernels.cuda.ptxcheck [float32|float64] [cc, e.g. 90] [--ptxas]

Needs numba-cuda and NVVM (the CUDA toolkit's libnvvm), no driver and no GPU: it tells
numba-cuda the device is `cc` and skips the NVRTC architecture query. Run it WITHOUT
NUMBA_ENABLE_CUDASIM. The argument types below mirror the launch sites (dense.py, loss.py,
update.py, batchnorm.py, epoch.py, fused.py, fused_epoch.py and __init__.py): keep them in
step (a kernel missing here is not checked). --ptxas also assembles each kernel with ptxas
(when on PATH) and prints its registers and shared memory per thread block. Exit status:
0 all compiled, 1 a kernel failed to compile, 77 no toolchain here (skip).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .. import contract

SKIP = 77


def _patch_for_offline(cc):
    """Let numba-cuda compile device functions and emit PTX with no driver present."""
    import numba.cuda.codegen as codegen
    import numba.cuda.cuda_paths as cuda_paths
    import numba.cuda.cudadrv.nvrtc as nvrtc
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Device()
    arch = (lambda major, minor: f"compute_{major}{minor}")
    nvrtc.get_arch_option = arch
    codegen.nvrtc.get_arch_option = arch
    cuda_paths._get_nvrtc_path = lambda: None


def signatures(ns):
    """Example arguments of every kernel, typed as the backend launches them."""
    dt = ns.dtype
    z = dt.type(0)
    a2 = np.zeros((2, 2), dt)
    a1 = np.zeros(2, dt)
    i64 = np.zeros(2, np.int64)
    f64 = np.zeros(8)
    hp = np.zeros((2, contract.HP_SIZE))
    lay_i = np.zeros((2, 2), np.int64)
    save = np.zeros((contract.BN_SAVE_ROWS, 2))
    i = 0
    sigs = {
        "gemm": (a2, a2, a2, i, i, i, i, i, i, a1, i, i, z, i, z, i, a2, a1, i,
                 a2, a2, a2, i, i, i, i, i, i, i, z, i, z, i, a2, i, i, i, i, z, i, z),
        "column_sums": (a2, a1),
        "forward_epilogue": (a2, a1, i, i, z, i, z, i, i, i, i, i, z, a2, True),
        "output_grad": (a2, a2, i, z, i, z, i, z, i, i, i, i),
        "activity_grad": (a2, a2, a2, i, z, i, z, i, z, i, i, i, i, z, z, True, True, 1.0, 1.0,
                          f64),
        "input_dropout": (a2, a2, i, z, i, i, i, i, i, z),
        "weight_noise": (a2, a2, z, i, i, i, i),
        "gather": (a2, a2, i64, i, i, a2, a2, i, z, i, i, i, i, z),
        "add_into": (a2, a2),
        "scale_by": (a2, z),
        "philox_counters": (np.zeros((2, 4), np.int64), i, i, np.zeros((2, 4), np.uint32)),
        "stream_words": (np.zeros(2, np.uint32), i, i, i, i, i),
        "loss_kernel": (a2, a2, i, i, i, a2, i, 1.0, True, z, f64, i, i, True, True, 1.0, i,
                        z, i, z, i, i, i, i),
        "set_learning_rate": (hp, f64, i),
        "copy_block": (a2, i, i, a2),
        "clip_grads": (a1, i64, i64, i, 1.0, f64),
        "update": (a1, a1, a1, a1, i64, i64, i64, hp, i64, i, i, f64, 1.0),
        "group_penalty": (a1, i64, i64, i64, i64, i64, hp, f64, 1.0),
        "columns": (a1, a1, i64, i64, i64, i64, i64, hp, f64, i, i),
        "bn_forward": (a2, a1, i, a2, a2, save, i, z, i, z, 1.0, i, i, i, i, i, z, a2, True),
        "bn_backward": (a2, a2, a2, save, a2, a1, i, a2, 1.0, f64),
    }
    if hasattr(ns, "fused_step"):   # the fused small-MLP path (fused.py, fused_epoch.py)
        sigs.update({
            "fused_step": (a2, a2, i64, i, i, a1, lay_i, a2, a1, a1, a1, f64, i, 1.0, i, i, i,
                           i, z, i, z),
            "fused_forward": (a2, a1, a1, lay_i, a2),
            "weight_grads": (a1, lay_i, a1, a1, i, f64, i, i, f64, 1.0),
            "fused_epoch": (a2, a2, i64, i, i, i, i, a1, a1, a1, a1, lay_i, a2, a1, a1, a1, i,
                            1.0, i, i, i, z, i, z, i, f64, i64, i64, i64, hp, i64, i, i64, i64,
                            i64, i64, i64, i, f64),
        })
    return sigs


def resources(ptx, cc):
    """(registers, shared bytes) of the one kernel in `ptx`, by ptxas -v; None without it."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch=sm_{cc[0]}{cc[1]}", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return (int(regs.group(1)) if regs else -1, int(smem.group(1)) if smem else 0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    want_ptxas = "--ptxas" in argv
    argv = [a for a in argv if a != "--ptxas"]
    dtype = np.dtype(argv[0] if argv else "float32")
    cc_num = int(argv[1]) if len(argv) > 1 else 90
    cc = (cc_num // 10, cc_num % 10)
    try:
        import numba
        from numba import cuda
        from numba.cuda import config
        from numba.cuda.cudadrv import nvvm
        if config.ENABLE_CUDASIM:
            raise RuntimeError("the simulator is on (unset NUMBA_ENABLE_CUDASIM)")
        nvvm.NVVM()
        _patch_for_offline(cc)
        from . import jit
    except Exception as exc:
        print(f"skip: no offline CUDA toolchain here ({exc})")
        return SKIP
    if jit.cuda is None:
        print("skip: numba-cuda is not installed")
        return SKIP
    ns = jit.build(*jit.config(dtype))
    failed = 0
    for name, args in signatures(ns).items():
        kernel = getattr(ns, name)
        sig = tuple(numba.typeof(a) for a in args)
        t = time.time()
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        line = f"ok   {name:18s} {time.time() - t:5.1f} s  {len(ptx):7d} chars of PTX"
        res = resources(ptx, cc) if want_ptxas else None
        if res is not None:
            line += f"  {res[0]:4d} registers  {res[1]:6d} bytes shared"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
