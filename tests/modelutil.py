"""Test helpers that look inside a model (Sequential or MultiTask) through its network."""
import numpy as np

from fastreg import backend as backends
from fastreg.kernels import contract
from fastreg.kernels.reference import epoch as spec
from fastreg.training import side_by_side, target_widths
from fastreg.validation import as_features


def trainable(model):
    """(names, arrays) of the trained tensors in the global order: W, b of every dense
    block, then gamma, beta (views) of a BatchNorm: the order of objective_and_gradients'
    gradients."""
    net = model._network
    names, arrays, first = [], [], 0
    for part in net.parts:
        label = part.label if len(net.parts) > 1 else "model"
        for i, blk in enumerate(part.blocks):
            l = first + i
            names += [f"{label}/dense_{i}/W", f"{label}/dense_{i}/b"]
            arrays += [net.store.tensor("W", l), net.store.tensor("b", l)]
            if blk.bn is not None:
                gb = net.store.tensor("gb", l)
                names += [f"{label}/batchnorm_{i}/gamma", f"{label}/batchnorm_{i}/beta"]
                arrays += [gb[contract.BN_GAMMA], gb[contract.BN_BETA]]
        first += len(part.blocks)
    return names, arrays


def objective_and_gradients(model, X, y, step=0):
    """sum_h w_h * loss_h of the batch (X, y) with the dropout masks and noise of `step`
    (BatchNorm: the batch statistics) and its gradients (in trainable()'s order), from the
    model's backend through the reference step (kernels/reference/epoch.py forward_backward);
    no update, the running statistics left as they were."""
    net = model._network
    X = as_features(X, "X", model.input_dim, model.dtype)
    Ys = model._targets(y, X.shape[0])
    plan = net.training_plan(model.optimizer, X.shape[0], target_widths(net, Ys))
    stats = net.store.stats.copy()
    losses, _, _ = spec.forward_backward(backends.get(model.backend), plan, X, side_by_side(Ys),
                                      np.arange(X.shape[0], dtype=np.int64), step)
    net.store.stats[...] = stats
    total = sum(net.parts[p].weight * losses[p] for p in net.heads)
    grads = []
    for l, blk in enumerate(net.blocks):
        grads += [plan.dWs[l].copy(), plan.dbs[l].copy()]
        if blk.bn is not None:
            grads += [plan.dgbs[l][contract.BN_GAMMA].copy(), plan.dgbs[l][contract.BN_BETA].copy()]
    return total, grads
