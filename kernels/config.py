"""One place for the flags every jitted kernel is compiled with.

``cache=True`` so a second process loads machine code from ``__pycache__`` instead of paying
the compile again. ``fastmath`` stays off: it lets LLVM reassociate sums, which would break
bit-for-bit determinism across thread counts and parity with the reference.
"""

JIT = dict(cache=True, nogil=True, fastmath=False)
JIT_PARALLEL = dict(JIT, parallel=True)

# Below this many elements an elementwise pass runs on one thread: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 16
