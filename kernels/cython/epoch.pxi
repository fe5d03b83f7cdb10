# The compiled epoch (twin of kernels/reference/epoch.py and kernels/numba/epoch.py): a whole
# epoch of a plan (kernels/plan.py) in C without the GIL, step for step as the reference, trunk
# and heads included; and the inference forward of one part. Included by _kernels.pyx.
#
# Shape legend: B batch rows, I fan_in, O fan_out, L layers, P parts.
#
# It runs on the plan's C view (state.pxi: LayerC, PartC, PlanC, EpochPlan).

cdef inline void* _part_source(PlanC* p, PartC* pt) noexcept nogil:
    """What part pt reads before its input transform: the gathered batch or a part's output."""
    if pt.src < 0:
        return p.xbuf
    return p.layers[p.parts[pt.src].end - 1].act


cdef inline void* _step_kernel(LayerC* ly) noexcept nogil:
    """The kernel layer ly's GEMMs read this step (reference step_kernel): Wn with weight
    noise on, else W."""
    if ly.Wn != NULL and ly.wnstd > 0:
        return ly.Wn
    return ly.W


cdef void _draw_weight_noise(PlanC* p, real* dtype_tag, uint32_t step) noexcept nogil:
    """Every noisy layer's Wn for this step (reference draw_weight_noise); dtype_tag only
    picks the float type."""
    cdef int l
    cdef LayerC* ly
    for l in range(p.L):
        ly = &p.layers[l]
        if ly.Wn != NULL and ly.wnstd > 0:
            _weight_noise(<real*>ly.W, <real*>ly.Wn, ly.n_in * ly.n_out, <real>ly.wnstd, p.k0,
                          p.k1, step, <uint32_t>l, p.wwords)


cdef void _layer_forward(PlanC* p, int l, real* x, Py_ssize_t n, uint32_t step) noexcept nogil:
    """Dense layer l's training forward over n rows, x -> its act (reference layer_forward)."""
    cdef LayerC* ly = &p.layers[l]
    if ly.bn:
        _bn_dense_forward(x, <real*>_step_kernel(ly), <real*>ly.b, <real*>ly.act, <real*>ly.xhat,
                          <real*>ly.gb, ly.save, n, ly.n_in, ly.n_out, ly.act_code,
                          <real>ly.slope, ly.thr, <real>ly.scale, ly.eps, p.k0, p.k1, step,
                          <uint32_t>l, p.words, ly.noise, <real>ly.nstd, <real*>ly.pre,
                          p.nwords)
    else:
        _dense_forward(x, <real*>_step_kernel(ly), <real*>ly.b, <real*>ly.act, n, ly.n_in,
                       ly.n_out, ly.act_code, <real>ly.slope, ly.thr, <real>ly.scale, p.k0, p.k1, step,
                       <uint32_t>l, p.words, ly.noise, <real>ly.nstd, <real*>ly.pre, p.nwords,
                       0)


cdef double _layer_backward(PlanC* p, int l, real* xin, real* dx, Py_ssize_t n,
                            uint32_t step) noexcept nogil:
    """Dense layer l's backward (reference layer_backward); dx NULL: not wanted. Returns its
    activity penalty of the step, (l1 sum |a| + l2 sum a^2) / n (0 without one)."""
    cdef LayerC* ly = &p.layers[l]
    cdef double sums[2]
    cdef bint has1 = ly.act_l1 != 0.0
    cdef bint has2 = ly.act_l2 != 0.0
    cdef real c1 = <real>(ly.act_l1 / <double>n)
    cdef real c2 = <real>(2.0 * ly.act_l2 / <double>n)
    cdef double pen = 0.0
    sums[0] = 0.0
    sums[1] = 0.0
    if ly.bn:
        _bn_dense_backward(<real*>ly.grad, <real*>ly.act, <real*>ly.xhat, xin,
                           <real*>_step_kernel(ly),
                           <real*>ly.gb, <real*>ly.stats, ly.save, <real*>ly.dW, <real*>ly.db,
                           <real*>ly.dgb, dx, n, ly.n_in, ly.n_out, ly.act_code,
                           <real>ly.slope, ly.thr, <real>ly.scale, ly.momentum, p.k0, p.k1,
                           step, <uint32_t>l, p.words, ly.noise, <real>ly.nstd, <real*>ly.pre,
                           p.nwords, c1, c2, has1, has2, sums)
    else:
        _dense_backward(<real*>ly.grad, <real*>ly.act, xin, <real*>_step_kernel(ly),
                        <real*>ly.dW, <real*>ly.db, dx, n, ly.n_in, ly.n_out, ly.act_code, <real>ly.slope,
                        ly.thr, <real>ly.scale, p.k0, p.k1, step, <uint32_t>l, p.words,
                        ly.noise, <real>ly.nstd, <real*>ly.pre, p.nwords, c1, c2, has1, has2,
                        sums, 0)
    if has1:
        pen += ly.act_l1 * sums[0]
    if has2:
        pen += ly.act_l2 * sums[1]
    return pen / <double>n


cdef void _layer_update(PlanC* p, int l, real* W, int64_t t) noexcept nogil:
    """The fused updates of layer l's tensors (reference layer_update): W (its weights), b,
    and a BatchNorm's gamma/beta as one vector of 2 O (never penalized); their penalties
    before the step into p.pens[3 l:3 l + 3]."""
    cdef LayerC* ly = &p.layers[l]
    cdef double* pen = p.pens + 3 * l
    pen[0] = _penalized_update(W, <real*>ly.dW, <real*>ly.mW, <real*>ly.vW, ly.n_in,
                               ly.n_out, True, ly.hpW, p.opt, t, p.scratch)
    if ly.b != NULL:
        pen[1] = _penalized_update(<real*>ly.b, <real*>ly.db, <real*>ly.mb, <real*>ly.vb, 1,
                                   ly.n_out, False, ly.hpb, p.opt, t, p.scratch)
    if ly.bn:
        pen[2] = _penalized_update(<real*>ly.gb, <real*>ly.dgb, <real*>ly.mgb, <real*>ly.vgb,
                                   1, 2 * ly.n_out, False, ly.hpgb, p.opt, t, p.scratch)


cdef int _train_step(PlanC* p, real* Y, Py_ssize_t Ky, int64_t* rows, Py_ssize_t n,
                     uint32_t step, int64_t t, double* pen, real* zrows,
                     Py_ssize_t zw) noexcept nogil:
    """One step on the gathered batch (p.xbuf) of the rows `rows` (reference train_step):
    p.losses gets the parts' batch losses; returns 0, before any backward, when one is not
    finite; else the backward and the updates, their penalty into pen (the tensors', then
    the step's activity penalties).

    The reference updates every layer after the whole backward, last layer first. Here each
    layer is updated as soon as its own backward is done: nothing reads its tensors later in
    the step (its dx used W before), so the weights come out the same bits, and dW, m, v are
    still in cache (measured, one thread, a 2-300-260-1 net at batch 256: 74 ms an epoch
    updating after the whole backward, 61 ms this way). The penalties are summed in the
    reference's order, last layer first."""
    cdef int q, k, l, finite = 1
    cdef Py_ssize_t r, i
    cdef double activity = 0.0
    cdef PartC* pt
    cdef LayerC* ly
    cdef real* x
    cdef real* yb
    cdef real* g
    cdef real* into
    cdef real wgt
    cdef real* trunk_out = <real*>p.layers[p.parts[0].end - 1].grad
    cdef Py_ssize_t tw = p.layers[p.parts[0].end - 1].n_out
    if p.wwords != NULL:
        _draw_weight_noise(p, trunk_out, step)
    for q in range(p.P):             # forward: the trunk, then the heads on its output
        pt = &p.parts[q]
        x = <real*>_part_source(p, pt)
        if pt.xdrop != NULL:
            _input_dropout(x, <real*>pt.xdrop, n, pt.width, pt.in_thr, <real>pt.in_scale, p.k0,
                           p.k1, step, <uint32_t>pt.first, p.words, pt.in_noise,
                           <real>pt.in_nstd, p.nwords, 0)
            x = <real*>pt.xdrop
        for l in range(pt.first, pt.end):
            _layer_forward(p, l, x, n, step)
            x = <real*>p.layers[l].act
        p.losses[q] = 0.0
        if pt.loss >= 0:
            yb = <real*>pt.ybuf
            for r in range(n):
                memcpy(yb + r * pt.ky, Y + rows[r] * Ky + pt.y0, pt.ky * sizeof(real))
            ly = &p.layers[pt.end - 1]
            if zrows != NULL and pt.z0 >= 0:   # the running metrics' logits
                for r in range(n):
                    memcpy(zrows + r * zw + pt.z0, <real*>ly.act + r * ly.n_out,
                           ly.n_out * sizeof(real))
            if pt.wcol < 0:
                p.losses[q] = _loss_forward_backward(<real*>ly.act, yb, <real*>ly.grad, n,
                                                     ly.n_out, pt.ky, pt.loss, pt.loss_param,
                                                     True)
            else:
                p.losses[q] = _weighted_loss_forward_backward(
                    <real*>ly.act, yb, <real*>ly.grad, n, ly.n_out, pt.ky, pt.loss,
                    pt.loss_param, Y, Ky, rows, pt.wcol)
            if not isfinite(p.losses[q]):
                finite = 0
    if not finite:
        return 0
    for k in range(p.P):             # backward: the heads in order, then the trunk
        q = k + 1 if k + 1 < p.P else 0
        pt = &p.parts[q]
        ly = &p.layers[pt.end - 1]
        if pt.weight != 1.0:
            g = <real*>ly.grad
            wgt = <real>pt.weight
            for i in range(n * ly.n_out):
                g[i] = g[i] * wgt
        into = NULL                  # the trunk: nobody needs the inputs' gradient
        if q == 1:                   # the first head writes the trunk's output gradient,
            into = trunk_out
        elif q > 1:                  # later ones add theirs
            into = <real*>p.head_grad
        for l in range(pt.end - 1, pt.first - 1, -1):
            if l > pt.first:
                activity += _layer_backward(p, l, <real*>p.layers[l - 1].act,
                                            <real*>p.layers[l - 1].grad, n, step)
            else:
                activity += _layer_backward(p, l, <real*>(pt.xdrop if pt.xdrop != NULL
                                                          else _part_source(p, pt)), into, n,
                                            step)
            if p.clip_mode == CLIP_NONE:     # clipping needs every gradient first
                _layer_update(p, l, <real*>p.layers[l].W, t)
        if q > 0:
            if pt.in_thr > 0 or pt.in_noise == NOISE_MUL:   # additive noise: the identity
                _input_dropout(into, into, n, pt.width, pt.in_thr, <real>pt.in_scale, p.k0,
                               p.k1, step, <uint32_t>pt.first, p.words,
                               NOISE_MUL if pt.in_noise == NOISE_MUL else NOISE_NONE,
                               <real>pt.in_nstd if pt.in_noise == NOISE_MUL else 0, p.nwords,
                               0)
            if q > 1:
                for i in range(n * tw):
                    trunk_out[i] = trunk_out[i] + into[i]
    if p.clip_mode != CLIP_NONE:     # clip the data gradients, then every update
        _clip_gradients(<real*>p.gflat, p.n_grad, p.segs, p.n_seg, p.clip_mode, p.clip_value)
        for l in range(p.L - 1, -1, -1):
            _layer_update(p, l, <real*>p.layers[l].W, t)
    for l in range(p.L - 1, -1, -1):  # the penalties, last layer first
        pen[0] += p.pens[3 * l]
        if p.layers[l].b != NULL:
            pen[0] += p.pens[3 * l + 1]
        if p.layers[l].bn:
            pen[0] += p.pens[3 * l + 2]
    pen[0] += activity                # the activity penalties (in backward order)
    return 1


cdef void _set_learning_rate(PlanC* p, double lr) noexcept nogil:
    """lr into the HP_LR slot of every layer's hp rows (reference Plan.set_learning_rate)."""
    cdef int l
    for l in range(p.L):
        p.layers[l].hpW[HP_LR] = lr
        p.layers[l].hpb[HP_LR] = lr
        p.layers[l].hpgb[HP_LR] = lr


cdef int _train_epoch(PlanC* p, real* X, real* Y, Py_ssize_t Ky, int64_t* perm,
                      Py_ssize_t n_total, Py_ssize_t batch_size, int64_t step0, int64_t t0,
                      double* lrs, double* loss_sums, double* out2, real* zout,
                      Py_ssize_t zw) noexcept nogil:
    """The batches of perm (reference train_epoch): loss_sums (P,) += the parts' batch losses
    times the batch rows; out2 = (penalty sum, steps). lrs[k] is step k's learning rate.
    Returns 1 if every batch loss was finite, else 0 (stopped before that batch's
    backward)."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t n, r
    cdef int64_t steps = 0
    cdef int q
    cdef double pen
    cdef double pen_sum = 0.0
    cdef real* xb = <real*>p.xbuf
    cdef int finite = 1
    while start < n_total:
        n = _min(batch_size, n_total - start)
        for r in range(n):
            memcpy(xb + r * p.I0, X + perm[start + r] * p.I0, p.I0 * sizeof(real))
        pen = 0.0
        _set_learning_rate(p, lrs[steps])
        if not _train_step(p, Y, Ky, perm + start, n, <uint32_t>(step0 + steps), t0 + steps,
                           &pen, zout + start * zw if zout != NULL else NULL, zw):
            finite = 0
            break
        for q in range(p.P):
            loss_sums[q] += p.losses[q] * n
        pen_sum += pen * n
        steps += 1
        start += batch_size
    out2[0] = pen_sum
    out2[1] = <double>steps
    return finite


def train_epoch(EpochPlan plan, X, Y, perm, Py_ssize_t batch_size, int64_t step0, int64_t t0,
                lrs, zout):
    """The batches of `perm` (an epoch, or a chunk of whole batches) over X, Y with step k's
    learning rate lrs[k] (float64, one per step: Plan.step_rates); returns (loss sums per
    part, penalty sum, steps, finite) as kernels/reference/epoch.py."""
    cdef double out2[2]
    cdef int finite, q
    cdef PlanC* p = &plan.p
    X = np.ascontiguousarray(X, plan.dtype)
    Y = np.ascontiguousarray(Y, plan.dtype)
    perm = np.ascontiguousarray(perm, np.int64)
    y_end = max([max(p.parts[q].y0 + p.parts[q].ky, p.parts[q].wcol + 1)
                 for q in range(p.P) if p.parts[q].loss >= 0], default=0)
    if X.ndim != 2 or X.shape[1] != p.I0 or Y.ndim != 2 or Y.shape[1] < y_end \
            or Y.shape[0] != X.shape[0]:
        raise ValueError("train_epoch: X, Y do not match the plan's layer sizes and targets")
    cdef Py_ssize_t n_total = perm.shape[0]
    if batch_size < 1 or min(batch_size, n_total) > p.batch:
        raise ValueError(f"train_epoch: batches of {min(batch_size, n_total)} rows do not fit "
                         f"the workspace of {p.batch}")
    if n_total and (perm.min() < 0 or perm.max() >= X.shape[0]):
        raise IndexError("train_epoch: perm holds a row index outside X")
    lrs = np.ascontiguousarray(lrs, np.float64)
    if lrs.ndim != 1 or lrs.shape[0] < (n_total + batch_size - 1) // batch_size:
        raise ValueError("train_epoch: lrs must hold one learning rate per step")
    cdef double* lrp = <double*>_data(lrs)
    # zout: (rows, width) in the plan dtype (Plan.logits_out checked it), or empty: not kept
    cdef void* zp = _data(zout) if zout.shape[0] > 0 else NULL
    cdef Py_ssize_t zw = zout.shape[1]
    loss_sums = np.zeros(p.P)
    cdef double* ls = <double*>_data(loss_sums)
    cdef int64_t* pp = <int64_t*>_data(perm)
    cdef void* xp = _data(X)
    cdef void* yp = _data(Y)
    cdef Py_ssize_t Ky = Y.shape[1]
    with nogil:
        if p.is_double:
            finite = _train_epoch(p, <double*>xp, <double*>yp, Ky, pp, n_total, batch_size,
                                  step0, t0, lrp, ls, out2, <double*>zp, zw)
        else:
            finite = _train_epoch(p, <float*>xp, <float*>yp, Ky, pp, n_total, batch_size,
                                  step0, t0, lrp, ls, out2, <float*>zp, zw)
    return loss_sums, out2[0], int(out2[1]), bool(finite)


# ---------------------------------------------------------------- inference
cdef void _forward_inference(LayerC* layers, int L, real* X, Py_ssize_t n_total, real* out,
                             real* buf0, real* buf1, Py_ssize_t batch) noexcept nogil:
    """Logits of X through the L layers, dropout and noise off, `batch` rows at a time; the
    last layer writes `out`."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t n
    cdef int l
    cdef real* x
    cdef real* dst
    cdef LayerC* ly
    cdef Py_ssize_t K = layers[L - 1].n_out
    while start < n_total:
        n = _min(batch, n_total - start)
        x = X + start * layers[0].n_in
        for l in range(L):
            ly = &layers[l]
            dst = out + start * K if l == L - 1 else (buf0 if l % 2 == 0 else buf1)
            _dense_forward(x, <real*>ly.W, <real*>ly.b, dst, n, ly.n_in, ly.n_out, ly.act_code,
                           <real>ly.slope, 0, 1, 0, 0, 0, <uint32_t>l, NULL, NOISE_NONE, 0,
                           NULL, NULL, 0)
            x = dst
        start += batch


def forward_inference(list Ws, list bs, acts, slopes, X, Py_ssize_t batch_size, out):
    """out (n, K) = the logits of X through the layers Ws, bs (one part's, with activation
    codes `acts` and slopes), in chunks of batch_size rows. The caller (__init__.py) gives
    C-contiguous arrays of one float dtype with matching shapes."""
    cdef int l, L = len(Ws)
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t rows = max(1, min(batch_size, n))
    cdef bint is_double = X.dtype == np.float64
    cdef void* xp = _data(X)
    cdef void* op = _data(out)
    cdef void* p0
    cdef void* p1
    cdef LayerC* layers
    if n == 0:
        return
    widest = max(W.shape[1] for W in Ws)
    buf0, buf1 = np.empty(rows * widest, X.dtype), np.empty(rows * widest, X.dtype)
    p0, p1 = _data(buf0), _data(buf1)
    layers = <LayerC*>calloc(L, sizeof(LayerC))
    if layers == NULL:
        raise MemoryError()
    try:
        for l in range(L):
            layers[l].W = _data(Ws[l])
            layers[l].b = _data(bs[l]) if bs[l].size else NULL
            layers[l].n_in, layers[l].n_out = Ws[l].shape
            layers[l].act_code = acts[l]
            layers[l].slope = slopes[l]
        with nogil:
            if is_double:
                _forward_inference(layers, L, <double*>xp, n, <double*>op, <double*>p0,
                                   <double*>p1, rows)
            else:
                _forward_inference(layers, L, <float*>xp, n, <float*>op, <float*>p0,
                                   <float*>p1, rows)
    finally:
        free(layers)
