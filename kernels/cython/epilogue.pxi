# The epilogues (twin of kernels/reference/epilogue.py and kernels/numba/epilogue.py): what a
# dense layer does after its GEMM (bias, activation, noise, dropout) and, in backward, before
# its GEMMs (dropout mask and GaussianDropout factor regenerated, f', the bias gradient), and
# a part's input transform. Forward and backward side by side. Included by _kernels.pyx.
#
# Shape legend: B batch rows, O fan_out, G Philox groups (4 words each).
#
# The loops take the activation as a tag (act_tag* tag, a fused type over the table's rows)
# and are called through the entry points generated from the contract's table (contract.pxi:
# _activate_row, _backward_row_masked / _plain, _backward_noise_row), so Cython compiles a
# branch-free copy per activation and the piecewise-linear ones vectorise. The activations'
# f and f' are in activation.pxi. An activation whose f' needs
# its input (grad_from "input") keeps z in the layer's pre buffer; the others read f' off
# the stored output (divided back by the dropout scale where the table says `unscale`), or
# off pre = f(z) before the noise when the layer has noise.

cdef inline real _noisy(real v, int noise, real nstd, real nrm) noexcept nogil:
    """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n)."""
    if noise == NOISE_ADD:
        return v + nstd * nrm
    return v * (<real>1 + nstd * nrm)


cdef void _fill_output_words(uint32_t* words, uint32_t* nwords, Py_ssize_t n, uint32_t k0,
                             uint32_t k1, uint32_t step, uint32_t layer, uint32_t thr,
                             int noise, bint backward, uint32_t g0) noexcept nogil:
    """The dropout words (with dropout, AlphaDropout's too) and the noise words (forward:
    with Gaussian noise; backward: with GaussianDropout only, additive noise leaves no trace
    in the gradient) of a layer; g0: _philox_fill's."""
    if thr > 0:
        _philox_fill(words, n, k0, k1, step, layer, STREAM_DROPOUT, g0)
    if noise == NOISE_MUL or (noise == NOISE_ADD and not backward):
        _philox_fill(nwords, n, k0, k1, step, layer, STREAM_NOISE, g0)


# ---------------------------------------------------------------- forward
cdef inline void _activate_span(real* row, real* pre, Py_ssize_t n, act_tag* tag,
                                real slope) noexcept nogil:
    """row <- f(row) (through _activate_row; one copy per activation, contract.pxi); an f
    whose f' reads its input keeps z in pre first (unless NULL: inference)."""
    cdef Py_ssize_t j
    if _tag_from_input(tag) and pre != NULL:
        for j in range(n):
            pre[j] = row[j]
    if act_tag is not act_linear_tag:
        for j in range(n):
            row[j] = _tag_f(row[j], tag, slope)


cdef inline real* _noise_keeps(real* pre, int act) noexcept nogil:
    """Where the noise pass stores f(z) for backward: pre for an f' read off the output, NULL
    for an f' that reads z (pre holds z already)."""
    return NULL if _act_from_input(act) else pre


cdef inline void _noise_one(real* row, real* pre, uint32_t* w, Py_ssize_t j, double nrm,
                            uint32_t thr, real scale, int noise, real nstd) noexcept nogil:
    cdef real v = row[j]
    if pre != NULL:
        pre[j] = v
    v = _noisy(v, noise, nstd, <real>nrm)
    if thr > 0:
        v = v * scale if w[j] >= thr else 0
    row[j] = v


cdef void _noise_span(real* row, real* pre, uint32_t* w, uint32_t* nwords, Py_ssize_t e0,
                      Py_ssize_t n, uint32_t thr, real scale, int noise,
                      real nstd) noexcept nogil:
    """row[j] <- dropout(noise(row[j])) (pre[j] <- row[j] first unless NULL), j < n; e0 is
    row[0]'s element index (the noise index). Whole Box-Muller pairs in the middle."""
    cdef Py_ssize_t j = 0
    cdef double c, s
    if e0 & 1 and n > 0:
        _noise_one(row, pre, w, 0, _normal(nwords, e0), thr, scale, noise, nstd)
        j = 1
    while j + 1 < n:
        _normal_pair(nwords, e0 + j, &c, &s)
        _noise_one(row, pre, w, j, c, thr, scale, noise, nstd)
        _noise_one(row, pre, w, j + 1, s, thr, scale, noise, nstd)
        j += 2
    if j < n:
        _noise_one(row, pre, w, j, _normal(nwords, e0 + j), thr, scale, noise, nstd)


cdef void _alpha_span(real* row, real* pre, uint32_t* w, Py_ssize_t n, uint32_t thr,
                      real scale, real shift) noexcept nogil:
    """AlphaDropout (contract NOISE_ALPHA): row[j] <- scale * (row[j] if kept else
    ALPHA_DROPPED) + shift (pre[j] <- row[j] first unless NULL), j < n; w: the dropout
    words of row[0]."""
    cdef Py_ssize_t j
    cdef real v
    cdef real dropped = <real>ALPHA_DROPPED
    for j in range(n):
        v = row[j]
        if pre != NULL:
            pre[j] = v
        if thr > 0 and w[j] < thr:
            v = dropped
        row[j] = v * scale + shift


cdef inline void _output_row(real* out, real* pre, uint32_t* words, uint32_t* nwords,
                             Py_ssize_t e0, Py_ssize_t n, uint32_t thr, real scale, int noise,
                             real nstd) noexcept nogil:
    """The part of a dense layer's forward epilogue after the activation (plain and
    BatchNorm layers): the n elements from flat index e0 of out <- dropout(noise(a)), with
    pre <- a first (pre not NULL: noise, or an activity penalty under dropout). out, pre,
    words: the layer's base pointers."""
    cdef Py_ssize_t j
    cdef real* row = out + e0
    cdef uint32_t* w
    if noise == NOISE_ALPHA:
        _alpha_span(row, pre + e0 if pre != NULL else NULL, words + e0, n, thr, scale, nstd)
    elif noise != NOISE_NONE:
        _noise_span(row, pre + e0 if pre != NULL else NULL, words + e0, nwords, e0, n, thr,
                    scale, noise, nstd)
    elif thr > 0:
        w = words + e0
        if pre != NULL:     # an activity penalty under dropout keeps a for backward
            memcpy(pre + e0, row, n * sizeof(real))
        for j in range(n):
            row[j] = row[j] * scale if w[j] >= thr else 0


cdef void _forward_rows(real* out, Py_ssize_t O, real* b, int act, real slope, uint32_t thr,
                        real scale, uint32_t* words, Py_ssize_t r0, Py_ssize_t r1, int noise,
                        real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """Rows r0..r1 of out: z = out + b, [pre = z], a = f(z), [pre = a, a = noise(a)],
    a * scale if kept else 0 (thr > 0)."""
    cdef Py_ssize_t i, j
    cdef real* row
    cdef real* keep_f = _noise_keeps(pre, act)
    for i in range(r0, r1):
        row = out + i * O
        if b != NULL:
            for j in range(O):
                row[j] = row[j] + b[j]
        _activate_row(row, pre + i * O if pre != NULL else NULL, O, act, slope)
        _output_row(out, keep_f, words, nwords, i * O, O, thr, scale, noise, nstd)


cdef void _forward_epilogue(real* out, Py_ssize_t B, Py_ssize_t O, real* b, int act,
                            real slope, uint32_t thr, real scale, uint32_t* words, int noise,
                            real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """Bias, activation, noise, dropout: one pass over the rows, in row chunks."""
    cdef Py_ssize_t c, n_chunks
    if B * O >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _forward_rows(out, O, b, act, slope, thr, scale, words, c * ROW_CHUNK,
                          _min(B, c * ROW_CHUNK + ROW_CHUNK), noise, nstd, pre, nwords)
    else:
        _forward_rows(out, O, b, act, slope, thr, scale, words, 0, B, noise, nstd, pre, nwords)


# ---------------------------------------------------------------- backward
cdef inline void _backward_span(real* grad, real* out, real* pre, uint32_t* w, real* db,
                                Py_ssize_t n, act_tag* tag, real slope, uint32_t thr,
                                real scale) noexcept nogil:
    """One row segment (one copy per activation): grad <- dL/dz (mask regenerated, f' from
    the output, or from z in pre), db += dz."""
    cdef Py_ssize_t j
    cdef real a, dz
    for j in range(n):
        if _tag_from_input(tag):
            a = pre[j]
        else:
            a = out[j]
            if thr > 0 and _tag_unscale(tag):
                a = a / scale       # dropped units: 0 / scale, unused
        if thr > 0:
            dz = (grad[j] * scale) * _tag_df(a, tag, slope) if w[j] >= thr else 0
        else:
            dz = grad[j] * _tag_df(a, tag, slope)
        grad[j] = dz
        if db != NULL:
            db[j] += dz


cdef inline void _backward_row(real* grad, real* out, real* pre, uint32_t* w, real* db,
                               Py_ssize_t n, int act, real slope, uint32_t thr,
                               real scale) noexcept nogil:
    if thr > 0:
        _backward_row_masked(grad, out, pre, w, db, n, act, slope, thr, scale)
    else:
        _backward_row_plain(grad, out, pre, w, db, n, act, slope, scale)


cdef inline void _dz_noise_one(real* grad, real* pre, uint32_t* w, real* db, Py_ssize_t j,
                               double nrm, act_tag* tag, real slope, uint32_t thr,
                               real scale, int noise, real nstd) noexcept nogil:
    cdef real d = grad[j]
    if thr > 0:
        d = d * scale
    if noise == NOISE_MUL:
        d = d * (<real>1 + nstd * <real>nrm)
    if act_tag is not act_linear_tag:
        d = d * _tag_df(pre[j], tag, slope)
    if thr > 0 and w[j] < thr:
        d = 0
    grad[j] = d
    if db != NULL:
        db[j] += d


cdef inline void _backward_noise_span(real* grad, real* pre, uint32_t* w, uint32_t* nwords,
                                      Py_ssize_t e0, real* db, Py_ssize_t n, act_tag* tag,
                                      real slope, uint32_t thr, real scale, int noise,
                                      real nstd) noexcept nogil:
    """A row segment of a layer with noise (one copy per activation): dz = ((g * scale) * (1 + std * n)) * f'(pre) if
    kept else 0 (reference order; scale with dropout only, the factor for NOISE_MUL only, f'
    for a nonlinear f only); e0 is the segment's first element (the noise index)."""
    cdef Py_ssize_t j = 0
    cdef double c = 0.0
    cdef double s = 0.0
    cdef bint mul = noise == NOISE_MUL
    if e0 & 1 and n > 0:
        _dz_noise_one(grad, pre, w, db, 0, _normal(nwords, e0) if mul else 0.0, tag, slope, thr,
                      scale, noise, nstd)
        j = 1
    while j + 1 < n:
        if mul:
            _normal_pair(nwords, e0 + j, &c, &s)
        _dz_noise_one(grad, pre, w, db, j, c, tag, slope, thr, scale, noise, nstd)
        _dz_noise_one(grad, pre, w, db, j + 1, s, tag, slope, thr, scale, noise, nstd)
        j += 2
    if j < n:
        _dz_noise_one(grad, pre, w, db, j, _normal(nwords, e0 + j) if mul else 0.0, tag, slope,
                      thr, scale, noise, nstd)


cdef inline void _output_grad_row(real* grad, real* out, real* pre, uint32_t* words,
                                  uint32_t* nwords, Py_ssize_t e0, real* db, Py_ssize_t n,
                                  int act, real slope, uint32_t thr, real scale, int noise,
                                  real nstd) noexcept nogil:
    """_output_row and f undone (plain and BatchNorm layers): the n elements from flat index
    e0 of grad <- dL/d(f's input) from dL/d(out) (mask and noise factor regenerated, f' from
    out, or from pre); db (unless NULL) += them. grad, out, pre, words: the layer's base
    pointers."""
    cdef real* pe = pre + e0 if pre != NULL else NULL
    if noise != NOISE_NONE:
        _backward_noise_row(grad + e0, pe, words + e0, nwords, e0, db, n, act, slope, thr,
                            scale, noise, nstd)
    else:
        _backward_row(grad + e0, out + e0, pe, words + e0, db, n, act, slope, thr, scale)


cdef void _backward_cols(real* grad, real* out, Py_ssize_t B, Py_ssize_t O, real* db,
                         int act, real slope, uint32_t thr, real scale, uint32_t* words,
                         Py_ssize_t c0, Py_ssize_t c1, int noise, real nstd, real* pre,
                         uint32_t* nwords) noexcept nogil:
    """Columns c0..c1 of every row, rows in order: each bias sum runs in row order."""
    cdef Py_ssize_t i, j
    cdef real* dbc = db + c0 if db != NULL else NULL
    if db != NULL:
        for j in range(c0, c1):
            db[j] = 0
    for i in range(B):
        _output_grad_row(grad, out, pre, words, nwords, i * O + c0, dbc, c1 - c0, act, slope,
                         thr, scale, noise, nstd)


# ---------------------------------------------------------------- backward: activity penalty
# A layer with an activity penalty (contract LF_ACTIVITY_*) runs _activity_backward instead
# of the element pass above (kernels/reference/epilogue.py activity_epilogue_backward is its
# spec); c1 = l1 / B, c2 = 2 l2 / B in the dtype.
cdef enum:
    ACTIVITY_CHUNK = 4 * 4096   # elements per task (the Numba backend's ELEM_CHUNK)


cdef inline void _activity_span(real* grad, real* out, real* pre, uint32_t* w,
                                uint32_t* nwords, Py_ssize_t e0, Py_ssize_t n, act_tag* tag,
                                real slope, uint32_t thr, real scale, int noise, real nstd,
                                real c1, real c2, bint has1, bint has2,
                                double* sums) noexcept nogil:
    """Elements e0..e0+n (grad, out, pre, w: the layer's base pointers; one copy per
    activation): grad <- (d + c1 sign(a) + c2 a) * f', d = dL/da from the data (mask, scale,
    GaussianDropout's factor undone), a = f of every unit (out without dropout and noise,
    else pre: a, or z for an input-derivable f); sums <- (sum |a|, sum a^2) in double."""
    cdef Py_ssize_t e
    cdef real d, a, v
    cdef double a64
    cdef double s1 = 0.0
    cdef double s2 = 0.0
    cdef bint plain = thr == 0 and noise == NOISE_NONE
    # selects (C ternaries), not branches, where the data decides (the mask, the sign): the
    # compiler if-converts them (-fno-trapping-math), no misprediction per element
    for e in range(e0, e0 + n):
        d = grad[e]
        if thr > 0:
            d = d * scale
        if noise == NOISE_MUL:
            d = d * (<real>1 + nstd * <real>_normal(nwords, e))
        if thr > 0:
            d = d if w[e] >= thr else <real>0
        if plain:
            a = out[e]
        elif _tag_from_input(tag):
            a = _tag_f(pre[e], tag, slope)
        else:
            a = pre[e]
        v = <real>1 if a > 0 else (<real>-1 if a < 0 else a)     # np.sign, NaN for NaN
        if has1 and has2:
            d = d + (c1 * v + c2 * a)
        elif has1:
            d = d + c1 * v
        else:
            d = d + c2 * a
        if act_tag is not act_linear_tag:
            v = pre[e] if _tag_from_input(tag) else a
            d = d * _tag_df(v, tag, slope)
        grad[e] = d
        a64 = <double>a
        s1 += fabs(a64)
        s2 += a64 * a64
    sums[0] = s1
    sums[1] = s2


cdef void _activity_backward(real* grad, real* out, Py_ssize_t B, Py_ssize_t O, real* db,
                             int act, real slope, uint32_t thr, real scale, uint32_t* words,
                             int noise, real nstd, real* pre, uint32_t* nwords, real c1,
                             real c2, bint has1, bint has2, double* sums) noexcept nogil:
    """The activity pass over the B x O elements in fixed chunks of ACTIVITY_CHUNK (in
    parallel from PARALLEL_MIN_ELEMENTS on), their (sum |a|, sum a^2) summed in chunk order
    into sums (the same for any thread count); then db (unless NULL) = the column sums of
    dz in row order."""
    cdef Py_ssize_t n = B * O
    cdef Py_ssize_t c, i, j
    cdef Py_ssize_t n_chunks = (n + ACTIVITY_CHUNK - 1) // ACTIVITY_CHUNK
    cdef double one_chunk[2]
    cdef double* partials = one_chunk
    sums[0] = 0.0
    sums[1] = 0.0
    if n_chunks > 1:
        partials = <double*>malloc(2 * n_chunks * sizeof(double))
        if partials == NULL:        # no memory for the partials: one chunk, the same sums
            partials = one_chunk
            n_chunks = 1
    if n_chunks == 1:
        _activity_row(grad, out, pre, words, nwords, 0, n, act, slope, thr, scale, noise, nstd,
                      c1, c2, has1, has2, partials)
    elif n >= PARALLEL_MIN_ELEMENTS:
        for c in prange(n_chunks, schedule="static"):
            _activity_row(grad, out, pre, words, nwords, c * ACTIVITY_CHUNK,
                          _min(n, c * ACTIVITY_CHUNK + ACTIVITY_CHUNK) - c * ACTIVITY_CHUNK,
                          act, slope, thr, scale, noise, nstd, c1, c2, has1, has2,
                          partials + 2 * c)
    else:
        for c in range(n_chunks):
            _activity_row(grad, out, pre, words, nwords, c * ACTIVITY_CHUNK,
                          _min(n, c * ACTIVITY_CHUNK + ACTIVITY_CHUNK) - c * ACTIVITY_CHUNK,
                          act, slope, thr, scale, noise, nstd, c1, c2, has1, has2,
                          partials + 2 * c)
    for c in range(n_chunks):
        sums[0] += partials[2 * c]
        sums[1] += partials[2 * c + 1]
    if partials != one_chunk:
        free(partials)
    if db != NULL:
        for j in range(O):
            db[j] = 0
        for i in range(B):
            for j in range(O):
                db[j] += grad[i * O + j]


cdef void _backward_epilogue(real* grad, real* out, Py_ssize_t B, Py_ssize_t O, real* db,
                             int act, real slope, uint32_t thr, real scale, uint32_t* words,
                             int noise, real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """dL/dz in place (mask and noise regenerated, f' from the output, or from pre) and the
    bias gradient in the same pass, over column chunks (each bias sum on one thread)."""
    cdef Py_ssize_t c, n_chunks
    if B * O >= PARALLEL_MIN_ELEMENTS and O >= 32:
        n_chunks = (O + COL_CHUNK - 1) // COL_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _backward_cols(grad, out, B, O, db, act, slope, thr, scale, words,
                           c * COL_CHUNK, _min(O, c * COL_CHUNK + COL_CHUNK), noise, nstd, pre,
                           nwords)
    else:
        _backward_cols(grad, out, B, O, db, act, slope, thr, scale, words, 0, O, noise, nstd,
                       pre, nwords)


# ---------------------------------------------------------------- a part's input transform
cdef void _input_dropout(real* x, real* out, Py_ssize_t B, Py_ssize_t I, uint32_t thr,
                         real scale, uint32_t k0, uint32_t k1, uint32_t step, uint32_t layer,
                         uint32_t* words, int noise, real nstd, uint32_t* nwords,
                         uint32_t g0) noexcept nogil:
    """out = dropout(noise(x)): streams STREAM_INPUT_NOISE and STREAM_INPUT_DROPOUT
    (AlphaDropout: the input-dropout mask, its scale and its shift nstd); g0: _philox_fill's."""
    cdef Py_ssize_t e, c, n_chunks
    cdef Py_ssize_t n = B * I
    if thr > 0:
        _philox_fill(words, n, k0, k1, step, layer, STREAM_INPUT_DROPOUT, g0)
    if noise == NOISE_NONE:
        for e in range(n):
            out[e] = x[e] * scale if words[e] >= thr else 0
        return
    if noise == NOISE_ALPHA:
        if out != x:
            memcpy(out, x, n * sizeof(real))
        _alpha_span(out, NULL, words, n, thr, scale, nstd)
        return
    _philox_fill(nwords, n, k0, k1, step, layer, STREAM_INPUT_NOISE, g0)
    if n >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (n + ROW_CHUNK * 1024 - 1) // (ROW_CHUNK * 1024)
        for c in prange(n_chunks, schedule="static"):
            _input_noise_range(x, out, c * ROW_CHUNK * 1024,
                               _min(n, (c + 1) * ROW_CHUNK * 1024), thr, scale, words, noise,
                               nstd, nwords)
    else:
        _input_noise_range(x, out, 0, n, thr, scale, words, noise, nstd, nwords)


cdef void _input_noise_range(real* x, real* out, Py_ssize_t lo, Py_ssize_t hi, uint32_t thr,
                             real scale, uint32_t* words, int noise, real nstd,
                             uint32_t* nwords) noexcept nogil:
    cdef Py_ssize_t e
    for e in range(lo, hi):
        out[e] = x[e]
    _noise_span(out + lo, NULL, words + lo, nwords, lo, hi - lo, thr, scale, noise, nstd)


def input_dropout(real[:, ::1] x, real[:, ::1] out, int64_t thr, double scale, uint32_t k0,
                  uint32_t k1, int64_t step, int64_t layer, int noise, double nstd,
                  int64_t row0=0):
    """out = dropout(noise(x)): x * scale where kept, else 0 (stream STREAM_INPUT_DROPOUT),
    after the noise (stream STREAM_INPUT_NOISE). out may be x (a gradient sent back).
    row0: the batch row of x's row 0 (_group_of_row)."""
    _check(x.shape[0] == out.shape[0] and x.shape[1] == out.shape[1],
           "input_dropout: shapes do not match")
    cdef uint32_t g0 = _group_of_row(row0, x.shape[1])
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(x.shape[0] * x.shape[1])
    cdef uint32_t[::1] nwords = _words_for(x.shape[0] * x.shape[1] if noise else 0)
    if x.shape[0] * x.shape[1] == 0:
        return
    with nogil:
        _input_dropout(&x[0, 0], &out[0, 0], x.shape[0], x.shape[1], t32, <real>scale, k0, k1,
                       <uint32_t>step, <uint32_t>layer, &words[0], noise, <real>nstd,
                       &nwords[0], g0)
