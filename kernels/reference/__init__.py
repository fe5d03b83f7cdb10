"""The reference backend ("numpy"): NumPy, float32 or float64. The readable spec of every
operation and the test oracle; the other backends (numba, cython, cuda) are twins with the
same module names and signatures (kernels/protocol.py lists the operations).

Shape legend: B batch rows, I fan_in, O fan_out, K outputs. Outputs are preallocated by the
caller and written in place; an empty array (size 0) means "not present" (no bias, no dx).

    dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=0, noise_std=0, pre=None, row0=0)
    dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=0, noise_std=0, pre=None, activity_l1=0,
                   activity_l2=0, row0=0) -> the layer's activity penalty of the step (0.0: none)
    bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=0, noise_std=0, pre=None)
    bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer, noise=0,
                      noise_std=0, pre=None, activity_l1=0, activity_l2=0) -> the same
    input_dropout(x, out, threshold, scale, seed, step, layer, noise=0, noise_std=0, row0=0)
        row0 (CPU backends): the batch row of the rows given, whose masks and noise they draw
        (an MPI rank's shard, kernels/reference/sharded.py; the compiled backends need
        row0 * width to be a multiple of 4; BatchNorm and the CUDA backend have none)
    weight_noise(W, out, std, seed, step, layer): out = W + std * n (the step's perturbed
                  kernel, stream STREAM_WEIGHT_NOISE)
    loss_forward_backward(logits, y, grad, loss) -> the batch's MEAN loss (float)
    loss_value(logits, y, loss) -> the batch's mean loss
    output_transform(logits, loss) -> what predict returns
    penalized_update(w, g, m, v, hp, opt, t) -> penalty of w before the step
    penalty_value(w, hp) -> penalty of w
    train_epoch(plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None)
        -> (loss sums per part, penalty sum, steps, finite)     (epoch.py)
    forward_inference(plan, X, batch_size, part=0) -> logits of one part
"""
import sys

from . import epoch
from .batchnorm import bn_dense_backward, bn_dense_forward
from .activation import activation, activation_grad, sigmoid
from .dense import dense_backward, dense_forward, weight_noise
from .epilogue import input_dropout
from .loss import loss_forward_backward, loss_value, output_transform
from .update import penalized_update, penalty_value, update_coefficients

NAME = "numpy"

_SELF = sys.modules[__name__]


def train_epoch(plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None):
    """One epoch through the spec (epoch.train_epoch) over these kernels; lrs: one learning
    rate per step (None: the optimizer's, every step); zout: the running logits."""
    return epoch.train_epoch(_SELF, plan, X, Y, perm, batch_size, step0, t0, lrs, zout)


def forward_inference(plan, X, batch_size, part=0):
    return epoch.forward_inference(_SELF, plan, X, batch_size, part)


__all__ = ["NAME", "dense_forward", "dense_backward", "bn_dense_forward", "bn_dense_backward",
           "input_dropout", "weight_noise", "loss_forward_backward", "loss_value", "output_transform",
           "penalized_update", "penalty_value", "update_coefficients", "train_epoch",
           "forward_inference", "activation", "activation_grad", "sigmoid"]
