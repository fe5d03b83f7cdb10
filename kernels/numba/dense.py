"""The Numba dense layer (twin of kernels/reference/dense.py): one GEMM and the epilogue,
forward and backward side by side.

Shape legend: B batch rows, I fan_in, O fan_out. GEMMs are ``npdot(a, b, out)``: the BLAS
calls Numba's ``np.dot(a, b, out)`` makes (sgemm/dgemm, gemv/dot for vector shapes,
transposes passed as flags, no copies), without the parts of np.dot that cost compile time
and that these callers do not need (see npdot).
"""
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic
from numba.np.arrayobj import make_array
from numba.np.linalg import call_xxdot, call_xxgemm, call_xxgemv, check_c_int, ensure_blas

from .. import contract
from .epilogue import (backward_epilogue, fill_output_words, forward_epilogue, noise_parallel,
                       noise_range)
from .jit import kernel
from .philox import philox_fill


@intrinsic
def _blas_product(typingcontext, a, b, out):
    """out (m, n) = a (m, k) @ b (k, n) for C or F (transposed view) operands and a C out:
    numba.np.linalg.dot_3_mm's code generation, call for call, so the bits are np.dot's.
    What it leaves out, np.dot compiles per signature (about 2 s each, and the backend has
    six): the copy of non-contiguous operands (layout "A" is refused at typing instead) and
    the shape checks with formatted messages (npdot checks the shapes)."""
    if not all(isinstance(t, types.Array) and t.ndim == 2 for t in (a, b, out)):
        raise TypingError("npdot takes 2-D arrays")
    if a.dtype != b.dtype or a.dtype != out.dtype:
        raise TypingError("npdot arguments must all have the same dtype")
    if a.layout not in "CF" or b.layout not in "CF" or out.layout != "C":
        raise TypingError("npdot takes C or F operands and a C output")

    def codegen(context, builder, sig, args):
        ensure_blas()
        xty, yty, outty = sig.args
        x = make_array(xty)(context, builder, args[0])
        y = make_array(yty)(context, builder, args[1])
        res = make_array(outty)(context, builder, args[2])
        x_shapes = cgutils.unpack_tuple(builder, x.shape)
        y_shapes = cgutils.unpack_tuple(builder, y.shape)
        out_shapes = cgutils.unpack_tuple(builder, res.shape)
        m, k = x_shapes
        n = y_shapes[1]
        for v in (m, k, n):
            check_c_int(context, builder, v)
        zero = context.get_constant(types.intp, 0)
        one = context.get_constant(types.intp, 1)
        empty = builder.or_(builder.icmp_signed("==", k, zero),
                            builder.or_(builder.icmp_signed("==", m, zero),
                                        builder.icmp_signed("==", n, zero)))
        with builder.if_else(empty, likely=False) as (is_empty, nonempty):
            with is_empty:
                cgutils.memset(builder, res.data, builder.mul(res.itemsize, res.nitems), 0)
            with nonempty:
                left_vec = builder.icmp_signed("==", m, one)
                right_vec = builder.icmp_signed("==", n, one)
                with builder.if_else(right_vec) as (r_vec, r_mat):
                    with r_vec:
                        with builder.if_else(left_vec) as (v_v, m_v):
                            with v_v:
                                call_xxdot(context, builder, False, xty.dtype, k, x.data,
                                           y.data, res.data)
                            with m_v:
                                call_xxgemv(context, builder, xty.layout == outty.layout, xty,
                                            x_shapes, x.data, y.data, res.data)
                    with r_mat:
                        with builder.if_else(left_vec) as (v_m, m_m):
                            with v_m:
                                call_xxgemv(context, builder, yty.layout != outty.layout, yty,
                                            y_shapes, y.data, x.data, res.data)
                            with m_m:
                                call_xxgemm(context, builder, xty, x_shapes, x.data, yty,
                                            y_shapes, y.data, outty, out_shapes, res.data)
        return context.get_dummy_value()

    return types.none(a, b, out), codegen


@kernel
def npdot(a, b, out):
    """out = a @ b, as np.dot(a, b, out) computes it (the same BLAS calls)."""
    if a.shape[1] != b.shape[0] or out.shape[0] != a.shape[0] or out.shape[1] != b.shape[1]:
        raise ValueError("npdot: incompatible shapes")
    _blas_product(a, b, out)


@kernel
def dense_forward(uses, par, x, W, b, out, act, slope, thr, scale, k0, k1, step, layer,
                  words, noise, nstd, pre, nwords, g0):
    """out = dropout(noise(f(x @ W + b))); pre = what f' needs when pre is not empty. g0:
    the Philox group of out's element 0 (philox_fill)."""
    npdot(x, W, out)
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, False, g0)
    forward_epilogue(uses, par, out, b, act, slope, thr, scale, words, noise, nstd, pre,
                     nwords)


@kernel
def dense_backward(uses, par, grad, out, x, W, dW, db, dx, act, slope, thr, scale, k0, k1,
                   step, layer, words, noise, nstd, pre, nwords, activity, g0):
    """grad (B, O) holds dL/d(out) on entry and dL/dz on exit; dW, db (if any), dx (if any).
    activity: None, or the layer's activity penalty (epilogue.activity_grads); returns its
    (sum |a|, sum a^2), (0, 0) without one. g0: dense_forward's."""
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, True, g0)
    sums = backward_epilogue(uses, par, grad, out, db, act, slope, thr, scale, words, noise,
                             nstd, pre, nwords, activity)
    npdot(x.T, grad, dW)
    if dx.size > 0:
        npdot(grad, W.T, dx)
    return sums


@kernel
def weight_noise(par, W, out, std, k0, k1, step, layer, words):
    """out = W + std * n (reference weight_noise): the step's perturbed kernel, n the normals
    of stream STREAM_WEIGHT_NOISE in W's row-major order (words: (4, G) scratch, G >=
    ceil(W.size / 4)), rounded to the dtype first; std in the dtype. The additive noise
    pass of the noise layers (NOISE_ADD, no mask), over fixed chunks when big enough."""
    n = W.size
    philox_fill(par, words, n, k0, k1, step, layer, contract.STREAM_WEIGHT_NOISE, 0)  # per weight
    flat = out.reshape(n)
    flat[:] = W.reshape(n)
    one = flat.dtype.type(1)
    if par is not None:
        if n >= contract.PARALLEL_MIN_ELEMENTS:
            noise_parallel(flat, words, contract.NOISE_ADD, std, words, 0, one)
            return
    noise_range(flat, flat[:0], False, words, contract.NOISE_ADD, std, words, 0, one, 0, n)
