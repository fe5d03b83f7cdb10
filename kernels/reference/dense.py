"""The reference dense layer: one GEMM and the epilogue (kernels/reference/epilogue.py),
forward and backward side by side.

Shape legend: B batch rows, I fan_in, O fan_out. Outputs are preallocated by the caller and
written in place; an empty array (size 0) means "not present" (no bias, no dx).
"""
from .. import contract
from .epilogue import (activate_keeping, activity_epilogue_backward, noise_values,
                       output_epilogue, output_epilogue_backward)


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=contract.NOISE_NONE, noise_std=0.0, pre=None, row0=0):
    """out = dropout(noise(f(x @ W + b))): what backward keeps (B*O values), and with noise
    and a nonlinear f also pre = f(x @ W + b) (contract.keeps_pre). row0: the batch row of
    x's row 0, whose masks and noise its rows draw (0 but on an MPI rank's shard: compiled
    backends need row0 * O to be a multiple of 4, one Philox group).

    Noise (stream STREAM_NOISE) comes after the activation and before the dropout: a Keras
    list Dense(activation), GaussianNoise, Dropout. It is training-only: inference passes
    noise = NOISE_NONE.
    """
    z = x @ W
    if b.size:
        z += b
    output_epilogue(activate_keeping(z, act, slope, pre), out, drop_threshold, drop_scale,
                    seed, step, layer, noise, noise_std, pre, act, row0)


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None,
                   activity_l1=0.0, activity_l2=0.0, row0=0):
    """grad (B, O) holds dL/d(out) on entry and dL/dz on exit; dW, db, dx written. Returns
    the layer's activity penalty of the step (0.0 without one). row0: dense_forward's.

    dz comes from output_epilogue_backward (mask, noise factor and f' regenerated or read
    from out / pre), or with an activity penalty (activity_l1, activity_l2: contract
    LF_ACTIVITY_*) from activity_epilogue_backward, which adds its gradient to dL/da before
    f'; then db = column sums, dW = x.T @ dz, dx = dz @ W.T.
    """
    dz, pen = epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed,
                                step, layer, noise, noise_std, pre, activity_l1, activity_l2,
                                row0)
    grad[...] = dz
    if db.size:
        db[...] = dz.sum(axis=0)
    dW[...] = x.T @ dz
    if dx.size:
        dx[...] = dz @ W.T
    return pen


def epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                      noise, noise_std, pre, activity_l1, activity_l2, row0=0):
    """(dL/d(f's input), activity penalty) of a plain or BatchNorm layer's output epilogue."""
    if activity_l1 or activity_l2:
        return activity_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale,
                                          seed, step, layer, noise, noise_std, pre,
                                          activity_l1, activity_l2, row0)
    return output_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed,
                                    step, layer, noise, noise_std, pre, row0), 0.0


def weight_noise(W, out, std, seed, step, layer):
    """out (I, O) = W + std * n: the perturbed kernel a training step with weight noise uses
    in its forward GEMM and its backward dx GEMM (contract LF_WEIGHT_NOISE_STD). n: the
    standard normals of (seed, step, layer, STREAM_WEIGHT_NOISE) in W's row-major element
    order, rounded once to the dtype; std * n and the sum in the dtype (as NOISE_ADD)."""
    nrm = noise_values(W.shape, W.dtype, seed, step, layer, contract.STREAM_WEIGHT_NOISE)
    out[...] = W + W.dtype.type(std) * nrm
