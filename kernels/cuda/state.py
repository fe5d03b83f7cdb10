"""The CUDA backend's plan state (twin of the C view of a plan the Cython backend builds,
kernels/cython/state.pxi): the device-resident copy of a plan that epoch.py runs.

`DevicePlan` holds a plan's state on the device, built once per plan workspace
(plan.cache["cuda"]; plan.allocate and invalidate() drop it): the ParamStore's flat buffers
uploaded once each (parameters, moments, running statistics; gradients beside them in the
same layout), so one launch updates every tensor and the per-layer tensors are views; the
workspace of one batch (every layer's output and dz in one flat buffer each, the pre
buffers, BatchNorm's zhat and batch statistics, the heads' input transforms and input
gradients); the update's tables; the status vector (loss.py); the training set, copied
once while the same arrays come back. Nothing comes back to the host per step.
"""
from collections import namedtuple

import numpy as np

from .. import contract
from . import fused, update
from .dense import Epilogue
from .jit import cuda, to_dev, tunables
from .loss import loss_slot, status_size, ST_PEN, ST_STEPS, ST_STOP

# the row views [:n] of the workspace for one batch size
Views = namedtuple("Views", "x y acts grads pres xhats xdrops scratch epis")


class DevicePlan:
    """A plan's state on the device (module docstring)."""

    def __init__(self, plan, ns):
        self.ns = ns
        dt = plan.dtype
        self.L = L = plan.n_layers
        self.P_count = plan.n_parts
        self.training = plan.training
        self.has_bias = [plan.bs[l].size > 0 for l in range(L)]
        self.bn = [self.training and plan.bn_on(l) for l in range(L)]
        self.widths = [W.shape for W in plan.Ws]
        self._views = {}
        self.data = None
        self.zout_d = None      # train_epoch's running-metrics logits on the device
        self.z_start = 0        # the row of zout the current batch starts at
        if not self.training:       # BatchNorm folded: Ws, bs are not all the store's
            self._upload_inference(plan)
            return
        store = plan.store
        self.P = cuda.to_device(store.params)
        self.G = cuda.device_array(store.size, dt)
        self.M = cuda.to_device(store.m) if store.m.size else ns.dummy1
        self.V = cuda.to_device(store.v) if store.v.size else ns.dummy1
        self.STATS = cuda.to_device(store.stats) if store.stats.size else None
        self.offsets = {}
        segments = []
        hps = {"W": plan.hpW, "b": plan.hpb, "gb": plan.hpgb}
        for r in store.records:
            self.offsets[(r.layer, r.kind)] = (r.offset, r.end, r.shape)
            segments.append((r.offset, r.shape, hps[r.kind][r.layer], r.kind == "W"))
        self.tab = update.segment_tables(ns, segments, store.m.size > 0)
        self.lr_now = float(plan.hpW[0, contract.HP_LR]) if L else None   # the rate in tab["hp"]
        self.Ws, self.bs, self.gbs = self._tensor_views(self.P, L)
        self.dWs, self.dbs, self.dgbs = self._tensor_views(self.G, L)
        self.stats = [self.STATS[off:off + 2 * o].reshape(2, o) if off >= 0 else ns.dummy
                      for off, (_, o) in zip(store.stat_offsets, self.widths)]
        self._workspace(plan)

    # ------------------------------------------------------------ buffers
    def _tensor_views(self, flat, L):
        """Per-layer views (W, b, gb) of a flat buffer of the store's layout."""
        ns, out = self.ns, ([], [], [])
        for l in range(L):
            for k, (kind, absent) in enumerate((("W", None), ("b", ns.dummy1),
                                                ("gb", ns.dummy))):
                where = self.offsets.get((l, kind))
                out[k].append(absent if where is None else flat[where[0]:where[1]].reshape(
                    where[2]))
        return out

    def _upload_inference(self, plan):
        """An inference plan's Ws, bs (folded BatchNorm included) in one flat buffer."""
        parts, self.offsets, off = [], {}, 0
        for l in range(self.L):
            for kind, a in (("W", plan.Ws[l]), ("b", plan.bs[l])):
                if a.size:
                    self.offsets[(l, kind)] = (off, off + a.size, a.shape)
                    parts.append(a.reshape(-1))
                    off += a.size
        self.P = cuda.to_device(np.concatenate(parts).astype(plan.dtype))
        self.Ws, self.bs, _ = self._tensor_views(self.P, self.L)
        self.chains = {}            # part -> fused inference tables, or None (tiled)

    def _workspace(self, plan):
        """The batch workspace, the fused path's tables and the status vector."""
        ns, dt, B, L = self.ns, plan.dtype, plan.batch, self.L
        self.keeps_pre = [plan.keeps_pre(l) for l in range(L)]
        # one flat buffer for the inputs and every layer's output (segment l + 1: layer l's
        # (B, O_l)), one for their dz (same layout), one for the pre buffers that are kept
        cols = [plan.Ws[0].shape[0]] + [o for _, o in self.widths]
        seg = np.concatenate([[0], np.cumsum([B * w for w in cols])]).astype(np.int64)
        self.ACTS = cuda.device_array(int(seg[-1]), dt)
        self.DZS = cuda.device_array(int(seg[-1]), dt)
        flat_view = lambda buf, k: buf[seg[k]:seg[k + 1]].reshape(B, cols[k])  # noqa: E731
        self.xbuf = flat_view(self.ACTS, 0)
        self.acts = [flat_view(self.ACTS, l + 1) for l in range(L)]
        self.grads = [flat_view(self.DZS, l + 1) for l in range(L)]
        pre_off, n_pre = [], 0
        for l in range(L):
            pre_off.append(n_pre if self.keeps_pre[l] else -1)
            n_pre += B * cols[l + 1] if self.keeps_pre[l] else 0
        self.PRE = cuda.device_array(max(n_pre, 1), dt)
        self.pres = [self.PRE[pre_off[l]:pre_off[l] + B * cols[l + 1]].reshape(B, cols[l + 1])
                     if self.keeps_pre[l] else None for l in range(L)]
        self.xhats = [cuda.device_array((B, cols[l + 1]), dt) if self.bn[l] else ns.dummy
                      for l in range(L)]
        self.saves = [cuda.device_array((contract.BN_SAVE_ROWS, cols[l + 1]), np.float64)
                      if self.bn[l] else ns.dummy for l in range(L)]
        self.parts = [tuple(int(v) for v in row) for row in plan.parts]
        self.trunk_last = self.parts[0][contract.PT_END] - 1
        trunk_w = cols[self.trunk_last + 1]
        self.has_in = [plan.has_input_transform(p) for p in range(self.P_count)]
        self.in_cfg = [plan.input_transform_of(p) for p in range(self.P_count)]
        self.xdrops = [cuda.device_array((B, trunk_w), dt) if p > 0 and self.has_in[p]
                       else None for p in range(self.P_count)]
        self.scratch = (cuda.device_array((B, trunk_w), dt) if self.P_count > 2 else None)
        # the gathered targets: every part's columns and sample-weight column (PT_W)
        ky = max([1] + [max(pt[contract.PT_Y1], pt[contract.PT_W] + 1) for pt in self.parts
                        if pt[contract.PT_LOSS] >= 0])
        self.ybuf = cuda.device_array((B, ky), dt)
        self.loss_parts = [p for p in range(self.P_count) if self.parts[p][contract.PT_LOSS] >= 0]
        self.weights = [dt.type(w) for w in plan.partf[:, contract.PF_WEIGHT]]
        self.loss_params = [float(v) for v in plan.partf[:, contract.PF_LOSS_PARAM]]
        self.cfg = [self._layer_config(plan, l) for l in range(L)]
        # weight noise: Wn = W + sigma * n per noisy layer, drawn once per step into a
        # W-sized device buffer and read by the forward GEMM and the backward dx GEMM
        self.wnstd = [dt.type(plan.weight_noise_of(l)) if contract.weight_noise_on(plan.lf, l)
                      else None for l in range(L)]
        self.Wns = [cuda.device_array(self.widths[l], dt) if self.wnstd[l] is not None
                    else None for l in range(L)]
        # (l1, l2) of every layer's activity penalty: such a layer's backward epilogue is the
        # activity_grad kernel, never fused into a GEMM or the loss kernel
        self.activity = [plan.activity_of(l) if plan.activity_on(l) else None
                         for l in range(L)]
        # the fused small-MLP path has no sample weights, clipping, running logits, weight
        # noise nor activity penalties: such a fit takes the general path
        self.fused = (hasattr(ns, "fused_step") and self.P_count == 1 and not any(self.bn)
                      and max(cols) <= ns.FW and self.parts[0][contract.PT_W] < 0
                      and self.parts[0][contract.PT_Z0] < 0
                      and plan.clip_mode == contract.CLIP_NONE
                      and all(s is None for s in self.wnstd)
                      and not any(a is not None for a in self.activity))
        self.clip = (int(plan.clip_mode), float(plan.clip_value))
        segs = plan.grad_segments()
        self.seg_lo, self.seg_hi = to_dev(segs[:, 0].copy()), to_dev(segs[:, 1].copy())
        if self.fused:
            P_off = [self._P_offsets(l) for l in range(L)]
            lay_i, lay_f = fused.tables(plan, list(range(L)), P_off, seg, pre_off)
            self.lay_i, self.lay_f = cuda.to_device(lay_i), cuda.to_device(lay_f)
            self.partials = cuda.device_array(max(1, -(-B // ns.FR)), np.float64)
        macs = 3 * B * sum(i * o for i, o in self.widths)
        self.one_block_epoch = self.fused and macs <= tunables().FUSED_EPOCH_MAX_MACS
        self.status = cuda.to_device(np.zeros(status_size(self.P_count)))

    def _P_offsets(self, l):
        b = self.offsets.get((l, "b"))
        return self.offsets[(l, "W")][0], (b[0] if b is not None else -1)

    def _layer_config(self, plan, l):
        """Python scalars of layer l (what its launches pass)."""
        dt = plan.dtype.type
        return dict(act=int(plan.li[l, contract.LI_ACT]), slope=dt(plan.lf[l, contract.LF_SLOPE]),
                    thr=int(plan.li[l, contract.LI_DROP_THR]),
                    scale=dt(plan.lf[l, contract.LF_DROP_SCALE]),
                    noise=int(plan.li[l, contract.LI_NOISE]),
                    nstd=dt(plan.lf[l, contract.LF_NOISE_STD]),
                    eps=float(dt(plan.lf[l, contract.LF_BN_EPS])),
                    momentum=float(dt(plan.lf[l, contract.LF_BN_MOMENTUM])))

    def views(self, n):
        """Row views [:n] of the workspace, made once per batch size."""
        v = self._views.get(n)
        if v is None:
            pres = [p[:n] if p is not None else None for p in self.pres]
            acts = [a[:n] for a in self.acts]
            epis = []
            for l, c in enumerate(self.cfg):
                stored = pres[l] if pres[l] is not None else acts[l]
                epis.append(Epilogue(stored, c["act"], c["slope"], c["thr"], c["scale"], l,
                                     c["noise"], c["nstd"]))
            v = Views(self.xbuf[:n], self.ybuf[:n], acts, [g[:n] for g in self.grads], pres,
                      [a[:n] if on else a for a, on in zip(self.xhats, self.bn)],
                      [x[:n] if x is not None else None for x in self.xdrops],
                      self.scratch[:n] if self.scratch is not None else None, epis)
            self._views[n] = v
        return v

    def dataset(self, X, Y):
        """The training set on the device, copied once while the same arrays come back."""
        d = self.data
        if d is None or d[0] is not X or d[1] is not Y or d[2] != (X.shape, Y.shape):
            self.data = d = (X, Y, (X.shape, Y.shape), to_dev(X), to_dev(Y))
        return d[3], d[4]

    def sync_to_host(self, plan):
        """Parameters, moments and running statistics back into the plan's store."""
        if not self.training:
            return
        store = plan.store
        store.params[...] = self.P.copy_to_host()
        if store.m.size:
            store.m[...] = self.M.copy_to_host()
        if store.v.size:
            store.v[...] = self.V.copy_to_host()
        if self.STATS is not None:
            store.stats[...] = self.STATS.copy_to_host()

    def results(self):
        """(loss sums per part, penalty sum, steps, finite) from the status vector."""
        res = self.status.copy_to_host()
        losses = np.array([res[loss_slot(p)] for p in range(self.P_count)])
        return losses, float(res[ST_PEN]), int(res[ST_STEPS]), bool(res[ST_STOP] == 0)
