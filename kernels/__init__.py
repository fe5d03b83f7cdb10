"""Compute kernels of fastreg (installed as ``fastreg.kernels``).

reference  NumPy, the readable spec and the test oracle
cpu        Numba @njit, the default CPU backend
philox     Philox4x32-10, the one source of random bits for every backend
contract   codes and layouts shared by every backend
driver     the Python epoch loop (reference, and any backend without a compiled loop)
"""
