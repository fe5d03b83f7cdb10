"""Pruning dead units, for every network (Sequential and MultiTask alike).

A hidden unit j of a dense block is dead when its incoming column W[:, j] is all exactly zero
(what L1's proximal step or GroupLasso leave): its output is then a constant at inference,
f(b_j) (f(0) without a bias), or with BatchNorm f(its folded bias); the constant's
contribution f(b_j) * W_next[j, :] is folded into each block that reads it: into its bias,
or into its running mean (subtracted) when that block has a BatchNorm. Blocks are visited in
the global order, so a unit whose inputs all came from removed units is found too. The
trunk's last block is read by the first block of every head: its dead units go into each
head, and are removed only where every reader can take the constant (a reader without bias
or BatchNorm takes only zero contributions). Output layers and a block's last unit are never
removed. W, b, gamma/beta, statistics and the optimizer moments shrink together, so fit()
continues without a new compile; the Dense layers are replaced by copies with the new
widths. Predictions are unchanged up to float32 rounding.
"""
import copy
from dataclasses import dataclass

import numpy as np

from .layers import Dense
from .kernels import contract
from .kernels.plan import ParamStore
from .kernels.reference import activation


@dataclass(frozen=True)
class PruneReport:
    """What prune() removed. Lists have one entry per Dense layer, in the global order.

    removed: units removed (0 for output layers); units_before / units_after: widths;
    params_before / params_after: count_params(); kept: the indices (in the layer before
    pruning) of the units kept, e.g. to map a unit of the pruned model back."""
    removed: list
    units_before: list
    units_after: list
    params_before: int
    params_after: int
    kept: list
    inputs_removed: tuple = ()      # prune(inputs=True): the input columns removed (indices
    #                                 of the X the model took before)

    @property
    def total_removed(self):
        return int(sum(self.removed))

    def _inputs_text(self):
        return (f"; removed input columns {list(self.inputs_removed)}"
                if len(self.inputs_removed) else "")

    def __str__(self):
        widths = ", ".join(f"{a}->{b}" for a, b in zip(self.units_before, self.units_after))
        return (f"pruned {self.total_removed} units (widths {widths}); params "
                f"{self.params_before} -> {self.params_after}{self._inputs_text()}")


@dataclass(frozen=True)
class FeatureSelection:
    """selected_features(): L1 as feature selection. kept / dropped: the input columns (of
    the X the model takes) whose row of the first layer's W has a nonzero entry / is exactly
    zero (such a column cannot change any output). prune(inputs=True) removes the dropped
    ones."""
    kept: np.ndarray
    dropped: np.ndarray

    def __str__(self):
        n = len(self.kept) + len(self.dropped)
        return (f"{len(self.kept)} of {n} input columns kept; exactly zero (dropped): "
                f"{self.dropped.tolist()}")


def selected_features(network):
    """The FeatureSelection of a built network (its first block's W reads the inputs)."""
    zero = ~network.store.tensor("W", 0).any(axis=1)
    return FeatureSelection(np.flatnonzero(~zero), np.flatnonzero(zero))


@dataclass(frozen=True)
class MultiTaskPruneReport(PruneReport):
    """What MultiTask.prune() removed: PruneReport's lists over every Dense layer in the
    global order (trunk, then each head: weight_names()); `parts` maps "trunk" and each head
    name to that part's own PruneReport."""
    parts: dict = None

    def __str__(self):
        widths = "; ".join(
            f"{label}: " + ", ".join(f"{a}->{b}" for a, b in zip(r.units_before,
                                                                 r.units_after))
            for label, r in self.parts.items())
        return (f"pruned {self.total_removed} units ({widths}); params "
                f"{self.params_before} -> {self.params_after}{self._inputs_text()}")


class _Pruning:
    """A network being pruned: per-block copies of its arrays, replaced (never written in
    place) as units go, installed all at once by commit()."""

    KINDS = (("W", 1), ("b", 0), ("gb", 1))

    def __init__(self, network):
        self.network = network
        store = network.store
        self.blocks = network.blocks
        L_ = len(self.blocks)
        self.arrays = {kind: [store.tensor(kind, l) for l in range(L_)] for kind, _ in self.KINDS}
        self.stats = [store.running_stats(l) for l in range(L_)]
        self.moments = {which: ({kind: [store.tensor(kind, l, getattr(store, which))
                                        for l in range(L_)] for kind, _ in self.KINDS}
                                if getattr(store, which).size else None)
                        for which in ("m", "v")}
        self.input_keep = None      # prune_inputs: the input columns kept
        self.units_before = [W.shape[1] for W in self.arrays["W"]]
        self.params_before = network.count_params()
        self.kept = [np.arange(u) for u in self.units_before]
        self.changed = False

    def _fold(self, j, delta):
        """Add delta (float64, per unit) to block j's pre-activation constant: into its
        running mean (subtracted) when it has a BatchNorm, else into its bias."""
        dtype = self.network.dtype
        if self.blocks[j].bn is not None:
            st = self.stats[j].astype(np.float64)
            st[contract.BN_MEAN] -= delta
            self.stats[j] = st.astype(dtype)
        elif self.arrays["b"][j].size:
            self.arrays["b"][j] = (self.arrays["b"][j].astype(np.float64) + delta).astype(dtype)

    def _take(self, kind, l, keep, axis):
        like = self.arrays[kind][l]
        if like.size == 0:
            return
        for which in ("m", "v"):
            ms = self.moments[which]
            if ms is not None and ms[kind][l].shape == like.shape:
                ms[kind][l] = np.ascontiguousarray(np.take(ms[kind][l], keep, axis=axis))
        self.arrays[kind][l] = np.ascontiguousarray(np.take(like, keep, axis=axis))

    def prune_block(self, l, readers):
        """Remove the dead units of block l, folding their constants into the blocks
        `readers` (global indices) that take its output."""
        W, b = self.arrays["W"][l], self.arrays["b"][l]
        dead = ~W.any(axis=0)
        if not dead.any():
            return
        blk = self.blocks[l]
        d = blk.dense
        if blk.bn is not None:     # the unit's inference constant: its folded bias
            z = self.network.folded_bias(self.arrays["gb"][l], self.stats[l], b,
                                         blk.bn.eps)[dead]
        else:
            z = b[dead] if b.size else np.zeros(int(dead.sum()), W.dtype)
        const = activation(z, *d.kernel_activation)
        contribs = [const.astype(np.float64)[:, None]
                    * self.arrays["W"][j][dead].astype(np.float64) for j in readers]
        removable = np.ones(int(dead.sum()), bool)
        for j, contrib in zip(readers, contribs):
            if self.arrays["b"][j].size == 0 and self.blocks[j].bn is None:   # nowhere to
                removable &= ~(contrib != 0).any(axis=1)                      # fold: zero
        idx = np.flatnonzero(dead)                                              # ones go
        dead[idx[~removable]] = False
        contribs = [c[removable] for c in contribs]
        if dead.all():
            dead[np.flatnonzero(dead)[0]] = False   # a Dense keeps at least one unit
            contribs = [c[1:] for c in contribs]
        if not dead.any():
            return
        keep = np.flatnonzero(~dead)
        for j, contrib in zip(readers, contribs):
            self._fold(j, contrib.sum(axis=0))
            self._take("W", j, keep, 0)
        self._take("W", l, keep, 1)
        self._take("b", l, keep, 0)
        self._take("gb", l, keep, 1)
        if self.stats[l].size:
            self.stats[l] = np.ascontiguousarray(np.take(self.stats[l], keep, axis=1))
        self.kept[l] = self.kept[l][keep]
        self.changed = True

    def prune_inputs(self):
        """Remove the input columns whose row of the first block's W is all exactly zero
        (one column always stays); returns the removed indices."""
        dead = ~self.arrays["W"][0].any(axis=1)
        if dead.all():
            dead[0] = False
        if not dead.any():
            return np.zeros(0, np.int64)
        self.input_keep = np.flatnonzero(~dead)
        self._take("W", 0, self.input_keep, 0)
        self.changed = True
        return np.flatnonzero(dead)

    def commit(self):
        """Install the pruned arrays and moments in a new store, and copies of the Dense
        layers with their new widths in the network's parts; returns the widths after."""
        network = self.network
        units_after = [W.shape[1] for W in self.arrays["W"]]
        if not self.changed:
            return units_after
        l = 0
        for part in network.parts:
            layers = []
            for layer in part.layers:
                if isinstance(layer, Dense):
                    if layer.units != units_after[l]:
                        layer = copy.copy(layer)
                        layer.units = units_after[l]
                    l += 1
                layers.append(layer)
            part.layers = layers
        network.refold()
        if self.input_keep is not None:
            before = (np.arange(network.input_dim) if network.input_columns is None
                      else network.input_columns)
            network.input_columns = before[self.input_keep]
            network.input_dim = len(self.input_keep)
        store = ParamStore(network.layer_shapes(network.input_dim), network.dtype)
        for l in range(len(units_after)):
            for kind, _ in self.KINDS:
                if self.arrays[kind][l].size:
                    store.tensor(kind, l)[...] = self.arrays[kind][l]
            if self.stats[l].size:
                store.running_stats(l)[...] = self.stats[l]
        for which in ("m", "v"):
            ms = self.moments[which]
            if ms is None:
                continue
            flat = np.zeros(store.size, network.dtype)
            for l in range(len(units_after)):
                for kind, _ in self.KINDS:
                    if ms[kind][l].size:
                        store.tensor(kind, l, flat)[...] = ms[kind][l]
            setattr(store, which, flat)
        network.store = store
        return units_after


def _part_params(store, first, end):
    """Parameters of blocks [first, end), running statistics included (as count_params)."""
    return int(sum(r.size for r in store.records if first <= r.layer < end)
               + sum(store.running_stats(l).size for l in range(first, end)))


def prune(network, inputs=False):
    """Prune a built network (module docstring); with inputs=True first remove the input
    columns no first-layer weight reads (selected_features' dropped: the model then takes
    the reduced X). Returns [PruneReport per part] (the global order: concatenate their
    lists; the trunk's report carries inputs_removed)."""
    before = network.store
    state = _Pruning(network)
    removed_inputs = state.prune_inputs() if inputs else np.zeros(0, np.int64)
    ranges = network.part_ranges()
    trunk_first, trunk_end = ranges[0]
    heads_first = [first for first, _ in ranges[1:]]
    for p, (first, end) in enumerate(ranges):
        for l in range(first, end - 1):
            state.prune_block(l, [l + 1])
        if p == 0 and heads_first:   # the trunk's last block feeds every head
            state.prune_block(end - 1, heads_first)
    units_after = state.commit()
    return [PruneReport(removed=[a - b for a, b in zip(state.units_before[first:end],
                                                       units_after[first:end])],
                        units_before=state.units_before[first:end],
                        units_after=units_after[first:end],
                        params_before=_part_params(before, first, end),
                        params_after=_part_params(network.store, first, end),
                        kept=state.kept[first:end],
                        inputs_removed=tuple(removed_inputs.tolist()) if p == 0 else ())
            for p, (first, end) in enumerate(ranges)]
