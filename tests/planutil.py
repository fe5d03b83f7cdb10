"""Plans built directly (no model), for the kernel tests of every backend: random weights,
every feature of the contract switchable, single-part (a Sequential) or trunk + heads."""
import numpy as np

from fastreg.kernels import contract
from fastreg.kernels.plan import LayerShape, ParamStore, make_plan, single_part
from fastreg.kernels.philox import dropout_scale, dropout_threshold


def random_plan(rng, dtype=np.float32, sizes=(3, 8, 6, 2), acts=None, drop=None, bn=None,
                noise=None, in_drop=0.0, in_noise=(contract.NOISE_NONE, 0.0), opt=contract.OPT_ADAM,
                momentum=0.9, nesterov=False, loss=contract.LOSS_MSE, l1=0.0, l2=0.0, proximal=True,
                group=0.0, maxnorm=0.0, bias=True, seed=5, heads=None, training=True,
                loss_param=None, activity=None):
    """A plan of dense layers fan-in sizes[0] -> ... -> sizes[-1]. Per-layer lists (acts,
    drop, bn, noise, activity: (l1, l2) of the activity penalty) default to tanh / no
    dropout / no BatchNorm / no noise / none. heads: None for
    one part, else [(layer sizes, loss, weight, input dropout rate), ...] of heads on the
    trunk's output (trunk = the layers of `sizes`, no loss)."""
    trunk_L = len(sizes) - 1
    widths = [list(sizes)]
    if heads:
        widths += [[sizes[-1]] + list(h[0]) for h in heads]
    layer_dims = [(w[i], w[i + 1]) for w in widths for i in range(len(w) - 1)]
    L = len(layer_dims)
    acts = list(acts) if acts is not None else [contract.ACT_TANH] * L
    drop = list(drop) if drop is not None else [0.0] * L
    bn = list(bn) if bn is not None else [False] * L
    noise = list(noise) if noise is not None else [(contract.NOISE_NONE, 0.0)] * L
    activity = list(activity) if activity is not None else [(0.0, 0.0)] * L
    shapes = [LayerShape(i, o, bias, bn[l]) for l, (i, o) in enumerate(layer_dims)]
    store = ParamStore(shapes, dtype)
    store.params[...] = (rng.standard_normal(store.size) * 0.5).astype(dtype)
    for l in range(L):
        if bn[l]:
            o = layer_dims[l][1]
            store.tensor("gb", l)[contract.BN_GAMMA] = (
                1 + 0.1 * rng.standard_normal(o)).astype(dtype)
            store.running_stats(l)[contract.BN_VAR] = (1 + rng.random(o)).astype(dtype)
    moments = ("m", "v") if opt != contract.OPT_SGD else (("m",) if momentum > 0 else ())
    store.reset_moments(moments)
    if store.m.size:
        store.m[...] = (0.01 * rng.standard_normal(store.size)).astype(dtype)
    if store.v.size:
        store.v[...] = (0.01 * rng.random(store.size)).astype(dtype)
    li = np.zeros((L, contract.LI_SIZE), np.int64)
    lf = np.zeros((L, contract.LF_SIZE), dtype)
    hp = [np.zeros((L, contract.HP_SIZE)) for _ in range(3)]
    for l in range(L):
        li[l, contract.LI_ACT] = acts[l]
        li[l, contract.LI_DROP_THR] = dropout_threshold(drop[l])
        li[l, contract.LI_HAS_BIAS] = int(bias)
        li[l, contract.LI_BN] = int(bn[l] and training)
        li[l, contract.LI_NOISE], lf[l, contract.LF_NOISE_STD] = noise[l]
        lf[l, contract.LF_SLOPE] = 0.05
        lf[l, contract.LF_DROP_SCALE] = dropout_scale(drop[l], np.dtype(dtype).type)
        lf[l, contract.LF_BN_EPS] = 1e-3
        lf[l, contract.LF_BN_MOMENTUM] = 0.9
        lf[l, contract.LF_ACTIVITY_L1], lf[l, contract.LF_ACTIVITY_L2] = activity[l]
        for row in hp:
            row[l, [contract.HP_LR, contract.HP_BETA1, contract.HP_BETA2, contract.HP_EPS,
                    contract.HP_NESTEROV, contract.HP_PROXIMAL]] = (
                1e-2, momentum if opt == contract.OPT_SGD else 0.9, 0.999, 1e-8, float(nesterov),
                1.0)
        hp[0][l, contract.HP_DECOUPLED] = 1e-2 if opt == contract.OPT_ADAMW else 0.0
        hp[0][l, [contract.HP_L1, contract.HP_L2, contract.HP_PROXIMAL, contract.HP_GROUP,
                  contract.HP_MAXNORM]] = (l1, l2, float(proximal), group, maxnorm)
    firsts = [0]
    for w in widths[:-1]:
        firsts.append(firsts[-1] + len(w) - 1)
    for p, first in enumerate(firsts):
        rate = in_drop if p == 0 else heads[p - 1][3]
        li[first, contract.LI_IN_DROP_THR] = dropout_threshold(rate)
        lf[first, contract.LF_IN_DROP_SCALE] = dropout_scale(rate, np.dtype(dtype).type)
    li[0, contract.LI_IN_NOISE], lf[0, contract.LF_IN_NOISE_STD] = in_noise
    y_width = lambda code, k: 1 if code == contract.LOSS_SCE else k  # noqa: E731
    if not heads:
        parts, partf = single_part(L, loss, y_width(loss, sizes[-1]), loss_param)
        y_widths = [y_width(loss, sizes[-1])]
    else:
        parts = np.zeros((len(widths), contract.PT_SIZE), np.int64)
        partf = np.zeros((len(widths), contract.PF_SIZE))
        partf[0, contract.PF_WEIGHT] = 1.0
        parts[0] = (0, trunk_L, -1, -1, 0, 0, -1, -1)
        y_widths, y0 = [0], 0
        for p, (h, first) in enumerate(zip(heads, firsts[1:]), start=1):
            k = y_width(h[1], h[0][-1])
            parts[p] = (first, first + len(h[0]), 0, h[1], y0, y0 + k, -1, -1)
            partf[p, contract.PF_WEIGHT] = h[2]
            partf[p, contract.PF_LOSS_PARAM] = (h[4] if len(h) > 4
                                                else contract.LOSS_BY_CODE[h[1]].default)
            y_widths.append(k)
            y0 += k
    plan = make_plan(store, li, lf, hp[0], hp[1], hp[2], parts, partf, opt, seed,
                     training=training)
    plan.y_widths = y_widths
    return plan


def random_targets(rng, plan, n, dtype=None):
    """Targets for every part with a loss, side by side (the layout train_epoch takes)."""
    dtype = dtype or plan.dtype
    cols = []
    for p in range(plan.n_parts):
        loss = int(plan.parts[p, contract.PT_LOSS])
        if loss < 0:
            continue
        k = plan.n_outputs[p]
        cols.append(targets_for(rng, loss, n, k, dtype))
    return np.ascontiguousarray(np.hstack(cols))


def targets_for(rng, loss, n, k, dtype):
    """(n, width) random targets of the kind the loss takes (contract Loss.targets)."""
    kind = contract.LOSS_BY_CODE[int(loss)].targets
    if kind == "labels":
        return rng.integers(0, k, (n, 1)).astype(dtype)
    if kind == "probabilities":
        return rng.random((n, k)).astype(dtype)
    if kind == "distributions":       # soft rows summing to 1, some one-hot
        y = rng.random((n, k)) ** 3
        y[::3] = np.eye(k)[rng.integers(0, k, len(y[::3]))]
        return (y / y.sum(axis=1, keepdims=True)).astype(dtype)
    if kind == "counts":
        return rng.poisson(2.0, (n, k)).astype(dtype)
    return rng.standard_normal((n, k)).astype(dtype)


def clone_plan(plan):
    """The same plan with copies of its store (for running two backends side by side)."""
    store = plan.store.copy()
    other = make_plan(store, plan.li.copy(), plan.lf.copy(), plan.hpW.copy(),
                      plan.hpb.copy(), plan.hpgb.copy(), plan.parts.copy(),
                      plan.partf.copy(), plan.opt, plan.seed, training=plan.training)
    other.y_widths = list(getattr(plan, "y_widths", []))
    return other


def run_epochs(backend, plan, X, Y, batch_size, epochs=2, perm_seed=1):
    """Allocate and train `epochs` epochs through `backend` (a kernels module); returns the
    list of train_epoch results."""
    plan.allocate(min(batch_size, X.shape[0]), plan.y_widths)
    out = []
    for e in range(epochs):
        perm = np.random.default_rng([perm_seed, e]).permutation(X.shape[0]).astype(np.int64)
        ctx = getattr(backend, "epoch_context", None)
        if ctx is None:
            out.append(backend.train_epoch(plan, X, Y, perm, batch_size, e * 1000, e * 100 + 1))
        else:
            with ctx(plan):
                out.append(backend.train_epoch(plan, X, Y, perm, batch_size, e * 1000,
                                               e * 100 + 1))
        sync = getattr(backend, "sync_to_host", None)
        if sync is not None:
            sync(plan)
    return out
