# The plan as C (used by epoch.pxi, the twin of the state the Numba backend passes its
# compiled epoch and of the CUDA backend's DevicePlan): per-layer and per-part structs of
# raw pointers into the plan's buffers (kernels/plan.py) and EpochPlan, which builds
# them. Included by _kernels.pyx.
#
# EpochPlan holds raw pointers into the plan's buffers, built once per workspace (kept in
# plan.cache, which plan.allocate clears) and refreshed before every call, so in-place
# changes of the configuration and hyperparameter rows (a learning-rate schedule) apply.

cdef struct LayerC:
    void* W
    void* Wn         # (I, O) the step's perturbed kernel (weight noise), or NULL: none
    double wnstd     # its sigma, in the param dtype already (lf); 0: off
    void* b          # NULL: no bias
    void* dW
    void* db
    void* mW         # NULL: no moment (SGD without momentum)
    void* vW
    void* mb
    void* vb
    void* act        # (batch, O) what backward keeps
    void* grad       # (batch, O)
    void* pre        # (batch, O) what f' needs besides the output (contract.keeps_pre), or NULL
    Py_ssize_t n_in
    Py_ssize_t n_out
    int act_code
    uint32_t thr
    double slope     # in the param dtype already (lf), exact in double
    double scale
    int noise        # NOISE_* on the output (li[l, LI_NOISE])
    double nstd      # its std, in the param dtype already (lf)
    double act_l1    # its activity penalty (lf LF_ACTIVITY_*), in the param dtype already
    double act_l2
    double hpW[HP_SIZE]
    double hpb[HP_SIZE]
    # BatchNorm (bn = 1; pointers NULL otherwise)
    int bn
    void* gb         # (2, O) gamma; beta
    void* dgb
    void* mgb        # NULL: no moment
    void* vgb
    void* stats      # (2, O) running mean; variance
    void* xhat       # (batch, O) zhat: what the BatchNorm backward keeps
    double* save     # (BN_SAVE_ROWS, O) batch statistics and backward scratch
    double eps
    double momentum
    double hpgb[HP_SIZE]


cdef struct PartC:
    int first        # its dense layers [first, end)
    int end
    int src          # -1: reads the inputs; else the part whose output it reads
    int loss         # LOSS_* or -1
    Py_ssize_t width # its input width
    Py_ssize_t y0    # its target columns [y0, y0 + ky) of Y
    Py_ssize_t ky
    Py_ssize_t wcol  # the column of Y with its rows' sample weights, or -1 (PT_W)
    Py_ssize_t z0    # its first column of train_epoch's zout (PT_Z0), or -1
    double weight    # its loss weight
    double loss_param  # its loss's parameter (PF_LOSS_PARAM)
    uint32_t in_thr  # its input transform (read on its first layer's row)
    double in_scale
    int in_noise
    double in_nstd
    void* xdrop      # (batch, width) its transformed input, or NULL: no input transform
    void* ybuf       # (batch, ky) its gathered targets, or NULL: no loss


cdef struct PlanC:
    int L
    int P
    LayerC* layers
    PartC* parts
    void* xbuf       # (batch, I0) the gathered inputs
    void* head_grad  # (batch, trunk width): a later head's input gradient (plan.scratch)
    double* losses   # (P,) the step's batch losses
    double* pens     # (L, 3) the step's penalties of W, b, gamma/beta per layer
    Py_ssize_t batch
    Py_ssize_t I0
    int opt
    uint32_t k0
    uint32_t k1
    uint32_t* words  # element-indexed Philox words, >= batch * widest layer (+3)
    uint32_t* nwords # the same for the noise stream (GaussianNoise / GaussianDropout)
    uint32_t* wwords # the weight-noise words, >= the largest noisy kernel (+3), or NULL
    double* scratch  # the update's (penalty row sums, column norms)
    int is_double
    void* gflat      # the flat gradient buffer (plan.grad) and its tensors' [offset, end)
    Py_ssize_t n_grad
    int64_t* segs    # (n_seg, 2)
    Py_ssize_t n_seg
    int clip_mode    # contract CLIP_*: the optimizer's clipping, before the updates
    double clip_value


cdef class EpochPlan:
    """Raw pointers to every buffer of a training plan. Holds references to the arrays it
    points into, so they outlive the pointers."""
    cdef PlanC p
    cdef list keep
    cdef readonly object dtype
    cdef object _segments    # the gradient segments p.segs points into

    def __cinit__(self):
        self.p.layers = NULL
        self.p.parts = NULL

    def __dealloc__(self):
        free(self.p.layers)
        free(self.p.parts)

    def __init__(self, plan, seed_words):
        cdef int l, q, L = plan.n_layers, P = plan.n_parts
        cdef LayerC* ly
        cdef PartC* pt
        dt = np.dtype(plan.dtype)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"the Cython kernels take float32 or float64, not {dt}")
        self.dtype = dt
        self.keep = []
        self.p.L = L
        self.p.P = P
        self.p.layers = <LayerC*>calloc(L, sizeof(LayerC))
        self.p.parts = <PartC*>calloc(P, sizeof(PartC))
        if self.p.layers == NULL or self.p.parts == NULL:
            raise MemoryError()
        B = plan.batch
        cols = max(W.shape[1] for W in plan.Ws)
        rows = max(W.shape[0] for W in plan.Ws)
        n_words = 4 * max(1, (B * max(cols, plan.Ws[0].shape[0]) + 3) // 4)
        words, nwords = np.zeros(n_words, np.uint32), np.zeros(n_words, np.uint32)
        scratch = np.zeros(max(2 * rows, 2 * cols, 2))
        losses, pens = np.zeros(P), np.zeros(3 * L)
        self.keep += [words, nwords, scratch, losses, pens]
        self.p.words = <uint32_t*>_data(words)
        self.p.nwords = <uint32_t*>_data(nwords)
        self.p.scratch = <double*>_data(scratch)
        self.p.losses = <double*>_data(losses)
        self.p.pens = <double*>_data(pens)
        # weight noise: Wn = W + sigma * n is drawn once per step into plan.wnoises[l] (a
        # W-sized scratch) and read by the forward GEMM and again by the backward's dx GEMM
        # (drawing twice would cost 2 I O normals a step to save I O values of memory)
        wnoises = list(getattr(plan, "wnoises", None) or [None] * L)
        n_wwords = max([0] + [a.size for a in wnoises if a is not None])
        self.p.wwords = NULL
        if n_wwords:
            wwords = np.zeros(4 * ((n_wwords + 3) // 4), np.uint32)
            self.keep.append(wwords)
            self.p.wwords = <uint32_t*>_data(wwords)
        for l in range(L):
            ly = &self.p.layers[l]
            ly.n_in, ly.n_out = plan.Ws[l].shape
            shape, vec, two = (ly.n_in, ly.n_out), (ly.n_out,), (2, ly.n_out)
            ly.W = self._ptr(plan.Ws[l], shape)
            ly.Wn = self._ptr_or_null(wnoises[l], shape)
            ly.dW = self._ptr(plan.dWs[l], shape)
            ly.mW = self._ptr_or_null(plan.mW[l], shape)
            ly.vW = self._ptr_or_null(plan.vW[l], shape)
            ly.b = self._ptr_or_null(plan.bs[l], vec)
            if ly.b != NULL:
                ly.db = self._ptr(plan.dbs[l], vec)
                ly.mb = self._ptr_or_null(plan.mb[l], vec)
                ly.vb = self._ptr_or_null(plan.vb[l], vec)
            ly.act = self._ptr(plan.acts[l], (B, ly.n_out))
            ly.grad = self._ptr(plan.grads[l], (B, ly.n_out))
            ly.pre = self._ptr_or_null(plan.pres[l], (B, ly.n_out))
            ly.bn = 1 if plan.bn_on(l) else 0
            if ly.bn:
                ly.gb = self._ptr(plan.gbs[l], two)
                ly.dgb = self._ptr(plan.dgbs[l], two)
                ly.mgb = self._ptr_or_null(plan.mgb[l], two)
                ly.vgb = self._ptr_or_null(plan.vgb[l], two)
                ly.stats = self._ptr(plan.stats[l], two)
                ly.xhat = self._ptr(plan.xhats[l], (B, ly.n_out))
                ly.save = <double*>self._ptr(plan.saves[l], (BN_SAVE_ROWS, ly.n_out),
                                             np.float64)
            if plan.opt != OPT_SGD and (ly.mW == NULL or ly.vW == NULL
                                        or (ly.b != NULL and (ly.mb == NULL or ly.vb == NULL))
                                        or (ly.bn and (ly.mgb == NULL or ly.vgb == NULL))):
                raise ValueError(f"EpochPlan: layer {l} has no Adam moments")
        for q in range(P):
            pt = &self.p.parts[q]
            pt.first, pt.end, pt.src, pt.loss, pt.y0, y1, pt.wcol, pt.z0 = (
                int(v) for v in plan.parts[q])
            pt.ky = y1 - pt.y0
            pt.width = plan.part_input_width(q)
            if not 0 <= pt.first < pt.end <= L or pt.src != (-1 if q == 0 else 0):
                raise ValueError(f"EpochPlan: part {q} is not a chain on the inputs (the "
                                 f"trunk) or on the trunk's output (a head)")
            source = (plan.Ws[0].shape[0] if pt.src < 0
                      else self.p.layers[self.p.parts[pt.src].end - 1].n_out)
            for l in range(pt.first, pt.end):
                width = source if l == pt.first else self.p.layers[l - 1].n_out
                if self.p.layers[l].n_in != width:
                    raise ValueError(f"EpochPlan: layer {l} takes {self.p.layers[l].n_in} "
                                     f"inputs, its input gives {width}")
            pt.xdrop = self._ptr_or_null(plan.xdrops[q], (B, pt.width))
            if pt.loss >= 0:
                k = self.p.layers[pt.end - 1].n_out
                if not (pt.ky in (1, SCE_MIXED_WIDTH) if pt.loss == LOSS_SCE else pt.ky == k):
                    raise ValueError(f"EpochPlan: part {q} has {pt.ky} target columns for "
                                     f"{k} outputs")
                pt.ybuf = self._ptr(plan.ybufs[q], (B, pt.ky))
        self.p.batch = B
        self.p.I0 = plan.Ws[0].shape[0]
        self.p.xbuf = self._ptr(plan.xbuf, (B, self.p.I0))
        self.p.head_grad = NULL
        if P > 2:
            self.p.head_grad = self._ptr(plan.scratch,
                                         (B, self.p.layers[self.p.parts[0].end - 1].n_out))
        self.p.opt = plan.opt
        self.p.clip_mode = plan.clip_mode
        self.p.clip_value = plan.clip_value
        self.p.n_grad = plan.grad.shape[0]
        self.p.gflat = self._ptr(plan.grad, (self.p.n_grad,))
        self._segments = np.ascontiguousarray(plan.grad_segments(), np.int64)
        self.p.n_seg = self._segments.shape[0]
        self.p.segs = <int64_t*>_data(self._segments)
        self.p.k0, self.p.k1 = seed_words
        self.p.is_double = dt == np.float64
        self.refresh(plan)

    def refresh(self, plan):
        """Re-read the configuration, hyperparameter and part-weight rows: cheap, done
        before every epoch so in-place changes (a learning-rate schedule) apply."""
        cdef int l, h, q
        cdef LayerC* ly
        cdef PartC* pt
        li, lf = np.asarray(plan.li, np.int64), np.asarray(plan.lf, np.float64)
        hpW, hpb = np.asarray(plan.hpW, np.float64), np.asarray(plan.hpb, np.float64)
        hpgb = np.asarray(plan.hpgb, np.float64)
        for a in (li, lf, hpW, hpb, hpgb):
            if a.ndim != 2 or a.shape[0] != self.p.L:
                raise ValueError("EpochPlan: li / lf / hp rows do not have one row per layer")
        if hpW.shape[1] < HP_SIZE or hpb.shape[1] < HP_SIZE or hpgb.shape[1] < HP_SIZE:
            raise ValueError(f"EpochPlan: hyperparameter rows need {HP_SIZE} slots")
        for l in range(self.p.L):
            ly = &self.p.layers[l]
            ly.act_code = li[l, LI_ACT]
            ly.thr = li[l, LI_DROP_THR]
            ly.slope = lf[l, LF_SLOPE]
            ly.scale = lf[l, LF_DROP_SCALE]
            ly.noise = li[l, LI_NOISE]
            ly.nstd = lf[l, LF_NOISE_STD]
            ly.act_l1 = lf[l, LF_ACTIVITY_L1]
            ly.act_l2 = lf[l, LF_ACTIVITY_L2]
            if plan.keeps_pre(l) and ly.pre == NULL:
                raise ValueError(f"EpochPlan: layer {l} needs a pre buffer (contract.keeps_pre)"
                                 f" that the workspace does not have")
            if (li[l, LI_BN] != 0) != (ly.bn != 0):
                raise ValueError("EpochPlan: BatchNorm turned on or off after the workspace "
                                 "was made")
            ly.wnstd = lf[l, LF_WEIGHT_NOISE_STD]
            if ly.wnstd > 0 and ly.Wn == NULL:
                raise ValueError(f"EpochPlan: layer {l} has weight noise but the workspace has "
                                 f"no weight-noise buffer (plan.wnoises)")
            ly.eps = lf[l, LF_BN_EPS]
            ly.momentum = lf[l, LF_BN_MOMENTUM]
            for h in range(HP_SIZE):
                ly.hpW[h] = hpW[l, h]
                ly.hpb[h] = hpb[l, h]
                ly.hpgb[h] = hpgb[l, h]
        for q in range(self.p.P):
            pt = &self.p.parts[q]
            pt.weight = plan.partf[q, PF_WEIGHT]
            pt.loss_param = plan.partf[q, PF_LOSS_PARAM]
            pt.in_thr = li[pt.first, LI_IN_DROP_THR]
            pt.in_scale = lf[pt.first, LF_IN_DROP_SCALE]
            pt.in_noise = li[pt.first, LI_IN_NOISE]
            pt.in_nstd = lf[pt.first, LF_IN_NOISE_STD]
            if (pt.in_thr > 0 or pt.in_noise != NOISE_NONE) != (pt.xdrop != NULL):
                raise ValueError(f"EpochPlan: part {q}'s input transform was turned on or off "
                                 f"after the workspace was made")

    cdef void* _ptr(self, a, shape, dtype=None) except? NULL:
        dtype = self.dtype if dtype is None else dtype
        if (not isinstance(a, np.ndarray) or a.dtype != dtype
                or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous
                or not a.flags.writeable):
            raise ValueError(f"EpochPlan: expected a writeable C-contiguous {np.dtype(dtype)} "
                             f"array of shape {tuple(shape)}, got {getattr(a, 'shape', a)!r}")
        self.keep.append(a)
        return _data(a)

    cdef void* _ptr_or_null(self, a, shape) except? NULL:
        if a is None or np.size(a) == 0:
            return NULL
        return self._ptr(a, shape)
