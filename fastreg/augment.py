"""Data augmentation inside the training loop, seeded: ``model.fit(..., augment=[...])``.

    GaussianJitter(stddev)   x + stddev * N(0, 1), per element
    Mixup(alpha)             lambda ~ Beta(alpha, alpha) per sample; x and y mixed with a
                             partner from the same batch (sparse labels: a pair and lambda)
    RandomFlip()             horizontal flip with probability 0.5   (image inputs)
    RandomShift(k)           shift by -k..k pixels in each direction, zero fill   (image inputs)

Image augmenters take ``image_shape=(H, W)`` or ``(H, W, C)`` (here or in ``fit``); each row of
X is one image flattened row-major in (H, W, C) order, as ``img.reshape(len(img), -1)`` does.

How it runs. Each epoch ``fit`` gathers the epoch's rows in their shuffled order (a copy: the
caller's arrays are never written), applies the augmenters in list order, vectorised over the
epoch, and hands the result to the backend's compiled epoch loop, unchanged. The batches are the
ones training uses (rows [b * batch_size, (b + 1) * batch_size) are the batch of training step
step0 + b), so augmenting the epoch at once is the same as augmenting batch by batch: every draw
is keyed per batch. Validation data, ``predict`` and ``evaluate`` are never augmented.

Randomness. Every draw is a Philox4x32-10 word (kernels/philox.py): key = the model seed,
counter = (element // 4, training step of the batch, position of the augmenter in the list,
STREAM_AUGMENT_*), word element % 4, where element = row in the batch * draws per row + draw.
So an augmentation is a pure function of (seed, step, row in the batch): the same on every
backend (it runs on the host, before the kernels), reproducible by seed, never repeated across
fits (the step counter never restarts), and never sharing bits with the dropout masks (another
stream word). Normals come from Box-Muller on word pairs (2i, 2i + 1) of each group of four;
uniforms are (word + 0.5) / 2**32; Beta(alpha, alpha) is its inverse CDF at a uniform.

Mixup and sparse_categorical_crossentropy: integer labels do not mix, so the mixed target of a
row is the pair of labels and the weight, y = (label, partner's label, lam) (three columns,
kernels/contract.py SCE_*), and the loss kernels of every backend compute the lambda-weighted
pair of losses lam * CE(label) + (1 - lam) * CE(partner's label) with the gradient
softmax - lam * e_label - (1 - lam) * e_partner's label (Zhang et al.'s formulation; the same
as cross-entropy against the mixed one-hot target). The inputs mix exactly as for the other
losses (the same lam and partner); lam in the targets is rounded to the model's dtype. One
Mixup per fit with this loss (two would need four labels per row).
"""
import math

import numpy as np

from .kernels import contract
from .kernels.philox import (MASK32, STREAM_AUGMENT_FLIP, STREAM_AUGMENT_JITTER,
                             STREAM_AUGMENT_MIXUP, STREAM_AUGMENT_PARTNER, STREAM_AUGMENT_SHIFT,
                             philox4x32_block, split_seed)
from .validation import as_features, check_int, check_real

# Philox words drawn per NumPy pass: bounds the temporaries (about 50 bytes per word).
_WORDS_PER_PASS = 1 << 21


# ---------------------------------------------------------------- the augmenters
class Augmenter:
    """Base class: a seeded transform of a batch of rows, vectorised over the rows."""
    needs_image = False

    def _bind(self, width, loss, image_shape):
        """What the transform needs at fit time (validated), from the data and the model."""
        return None

    def _apply(self, x, y, draws, bound):
        raise NotImplementedError


class GaussianJitter(Augmenter):
    """x + stddev * N(0, 1), an independent normal per element (stddev >= 0)."""

    def __init__(self, stddev=0.1):
        self.stddev = _check_number("GaussianJitter stddev", stddev, minimum=0.0)

    def _apply(self, x, y, draws, bound):
        noise = draws.normals(STREAM_AUGMENT_JITTER, x.shape[1])
        return (x + self.stddev * noise).astype(x.dtype), y

    def __repr__(self):
        return f"GaussianJitter(stddev={self.stddev!r})"


class Mixup(Augmenter):
    """Mixup (Zhang et al., 2018): x <- lam * x + (1 - lam) * x[j], y likewise, with
    lam ~ Beta(alpha, alpha) drawn per sample and j a random partner in the same batch (a
    random permutation of the batch). mse and binary_crossentropy targets mix directly; with
    sparse_categorical_crossentropy the target becomes (y, y[j], lam), whose loss is
    lam * CE(y) + (1 - lam) * CE(y[j]) (see the module docstring)."""

    def __init__(self, alpha=0.2):
        self.alpha = _check_number("Mixup alpha", alpha, minimum=0.0, strict=True)

    def _bind(self, width, loss, image_shape):
        """True for sparse labels: the targets become (label, partner's label, lam)."""
        return loss == contract.LOSS_SCE

    def lambdas(self, draws):
        """lam per row: the inverse Beta(alpha, alpha) CDF at one Philox uniform per row."""
        u = draws.uniforms(STREAM_AUGMENT_MIXUP, 1)[:, 0]
        from scipy.special import betaincinv   # here: scipy.special costs 0.4 s to import
        return betaincinv(self.alpha, self.alpha, u)

    def _apply(self, x, y, draws, bound):
        lam = self.lambdas(draws)[:, None]
        partner = draws.batch_permutation(STREAM_AUGMENT_PARTNER)
        x = (lam * x + (1.0 - lam) * x[partner]).astype(x.dtype)
        if y is not None and bound:     # sparse labels: (label a, label b, lam), contract SCE_*
            mixed = np.empty((y.shape[0], contract.SCE_MIXED_WIDTH), y.dtype)
            mixed[:, contract.SCE_LABEL] = y[:, 0]
            mixed[:, contract.SCE_LABEL_B] = y[partner, 0]
            mixed[:, contract.SCE_LAM] = lam[:, 0]
            y = mixed
        elif y is not None:
            y = (lam * y + (1.0 - lam) * y[partner]).astype(y.dtype)
        return x, y

    def __repr__(self):
        return f"Mixup(alpha={self.alpha!r})"


class _ImageAugmenter(Augmenter):
    needs_image = True

    def __init__(self, image_shape=None):
        self.image_shape = None if image_shape is None else check_image_shape(image_shape)

    def _bind(self, width, loss, image_shape):
        shape = self.image_shape or image_shape
        if shape is None:
            raise ValueError(f"{type(self).__name__} works on images: give image_shape=(H, W) or "
                             f"(H, W, C) to it or to fit (each row of X one image, flattened "
                             f"row-major in (H, W, C) order)")
        _check_width(shape, width, type(self).__name__)
        return shape

    @staticmethod
    def _images(x, shape):
        return x.reshape(x.shape[0], *shape)


class RandomFlip(_ImageAugmenter):
    """Horizontal flip (the W axis reversed) of each image with probability 0.5."""

    def _apply(self, x, y, draws, bound):
        flip = draws.words(STREAM_AUGMENT_FLIP, 1)[:, 0] >= np.uint32(1 << 31)
        img = self._images(x, bound)
        out = np.where(flip[:, None, None, None], img[:, :, ::-1, :], img)
        return out.reshape(x.shape), y

    def __repr__(self):
        return f"RandomFlip(image_shape={self.image_shape!r})"


class RandomShift(_ImageAugmenter):
    """Shift each image by dy, dx drawn uniformly from -k..k (independently), zero fill:
    out[r, c] = img[r - dy, c - dx] where that pixel exists, else 0 (dy > 0 moves down,
    dx > 0 right)."""

    def __init__(self, k=2, image_shape=None):
        self.k = check_int("RandomShift k", k, 0, what="an integer >= 0 (pixels)")
        super().__init__(image_shape)

    def offsets(self, draws):
        """(dy, dx) per row in -k..k: two words per row, scaled by multiply-high."""
        w = draws.words(STREAM_AUGMENT_SHIFT, 2).astype(np.uint64)
        d = ((w * np.uint64(2 * self.k + 1)) >> np.uint64(32)).astype(np.int64) - self.k
        return d[:, 0], d[:, 1]

    def _apply(self, x, y, draws, bound):
        if self.k == 0:
            return x, y
        H, W, _ = bound
        dy, dx = self.offsets(draws)
        rows = np.arange(H)[None, :] - dy[:, None]          # (n, H) source rows
        cols = np.arange(W)[None, :] - dx[:, None]          # (n, W) source columns
        inside = (((rows >= 0) & (rows < H))[:, :, None]
                  & ((cols >= 0) & (cols < W))[:, None, :])   # (n, H, W)
        img = self._images(x, bound)
        n = x.shape[0]
        moved = img[np.arange(n)[:, None, None], np.clip(rows, 0, H - 1)[:, :, None],
                    np.clip(cols, 0, W - 1)[:, None, :]]      # (n, H, W, C)
        out = np.where(inside[..., None], moved, x.dtype.type(0))
        return out.reshape(x.shape), y

    def __repr__(self):
        return f"RandomShift(k={self.k!r}, image_shape={self.image_shape!r})"


# ---------------------------------------------------------------- validation
def _check_number(name, value, minimum, strict=False):
    return check_real(name, value, minimum, min_open=strict)


def check_image_shape(image_shape):
    """(H, W) or (H, W, C) of positive integers, returned as (H, W, C)."""
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if shape is None or len(shape) not in (2, 3) or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in shape):
        raise ValueError(f"image_shape must be (H, W) or (H, W, C) of positive integers, got "
                         f"{image_shape!r}")
    return tuple(int(v) for v in shape) + ((1,) if len(shape) == 2 else ())


def _check_width(shape, width, who):
    H, W, Cc = shape
    if H * W * Cc != width:
        raise ValueError(f"{who}: image_shape {shape} holds H*W*C = {H * W * Cc} values but X "
                         f"has {width} features per row")


def prepare(augment, width, loss, image_shape=None):
    """Validate fit's `augment` and `image_shape` against the data and the loss.

    Returns the plan [(augmenter, bound), ...] (empty: no augmentation). Raises TypeError for
    anything that is not an augmenter, ValueError for shapes or losses that do not fit."""
    if image_shape is not None:
        image_shape = check_image_shape(image_shape)
        _check_width(image_shape, width, "fit")
    if augment is None:
        return []
    items = [augment] if isinstance(augment, Augmenter) else augment
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"augment must be a list of fastreg augmenters (GaussianJitter, Mixup, "
                        f"RandomFlip, RandomShift), got {augment!r}")
    plan = []
    for aug in items:
        if not isinstance(aug, Augmenter):
            raise TypeError(f"augment takes fastreg augmenters (GaussianJitter, Mixup, "
                            f"RandomFlip, RandomShift), got {aug!r}")
        plan.append((aug, aug._bind(width, loss, image_shape)))
    mixups = [aug for aug, _ in plan if isinstance(aug, Mixup)]
    if loss == contract.LOSS_SCE and len(mixups) > 1:
        raise ValueError(f"at most one Mixup with sparse_categorical_crossentropy (its mixed "
                         f"target is one pair of labels and a weight; mixing twice would need "
                         f"four labels per row), got {len(mixups)}: {mixups!r}")
    return plan


def target_width(plan, width):
    """Columns of the targets the plan trains on, for targets of `width` columns:
    contract.SCE_MIXED_WIDTH after a Mixup of sparse labels, else `width` unchanged."""
    sparse_mix = any(isinstance(aug, Mixup) and bound for aug, bound in plan)
    return contract.SCE_MIXED_WIDTH if sparse_mix else width


# ---------------------------------------------------------------- applying a plan
def augment_epoch(plan, X, Y, perm, batch_size, seed, step0):
    """The augmented rows X[perm], Y[perm] (new arrays), batch b trained at step step0 + b."""
    x = X[perm]
    y = None if Y is None else Y[perm]
    for position, (aug, bound) in enumerate(plan):
        draws = _Draws(seed, step0, batch_size, x.shape[0], position)
        x, y = aug._apply(x, y, draws, bound)
    x = np.ascontiguousarray(x, dtype=X.dtype)
    if y is not None:
        y = np.ascontiguousarray(y, dtype=Y.dtype)
    return x, y


def prepare_heads(augment, width, losses, image_shape=None):
    """One `prepare` plan per head (losses: {head: loss name}, in head order), or None
    without augmentation. Checks that do not depend on a loss come first, unprefixed; a head
    whose loss an augmenter refuses (e.g. two Mixups with sparse labels) is named."""
    if not prepare(augment, width, contract.LOSS_MSE, image_shape):
        return None
    plans = []
    for head, loss in losses.items():
        try:
            plans.append(prepare(augment, width, contract.LOSSES[loss], image_shape))
        except ValueError as exc:    # every augmenter applies to every head's targets
            raise ValueError(f"head {head!r} ({loss}): {exc}") from None
    return plans


def augment_heads(plans, losses, X, Ys, perm, batch_size, seed, step0):
    """The epoch's rows in training order for every head: (X[perm] augmented, [Y_h]).

    plans: prepare_heads' plans; losses: the heads' loss names, in the same order as Ys.
    Heads whose plans are the same are augmented in one call, their targets side by side (mse
    and binary_crossentropy targets mix column by column), so every head's targets get the
    same partner and lambda; a sparse-label head gets its own call (the same draws: its Mixup
    targets become (label, partner's label, lambda) rows). Without a Mixup the targets are
    not transformed: the inputs alone."""
    if not any(isinstance(aug, Mixup) for aug, _ in plans[0]):
        Xe, _ = augment_epoch(plans[0], X, None, perm, batch_size, seed, step0)
        return Xe, [np.ascontiguousarray(Y[perm]) for Y in Ys]
    groups = []     # [(plan, [head indices], sparse)]
    for k, plan in enumerate(plans):
        sparse = losses[k] == "sparse_categorical_crossentropy"
        same = [g for g in groups if not sparse and g[2] is False
                and [b for _, b in g[0]] == [b for _, b in plan]]
        if same:
            same[0][1].append(k)
        else:
            groups.append((plan, [k], sparse))
    Xe, Yes = None, [None] * len(Ys)
    for plan, members, _ in groups:
        Y = Ys[members[0]] if len(members) == 1 else np.hstack([Ys[k] for k in members])
        x, Ym = augment_epoch(plan, X, Y, perm, batch_size, seed, step0)
        Xe = x if Xe is None else Xe
        if len(members) == 1:
            Yes[members[0]] = Ym
        else:
            cuts = np.cumsum([Ys[k].shape[1] for k in members])[:-1]
            for k, part in zip(members, np.split(Ym, cuts, axis=1)):
                Yes[k] = np.ascontiguousarray(part)
    return Xe, Yes


def apply(augmenters, X, y=None, *, batch_size=None, seed=0, step=0, image_shape=None,
          loss="mse"):
    """What fit would train on: the rows of X (and y) in their order, cut into batches of
    `batch_size` (default: one batch), batch b augmented as at training step `step` + b by a
    model with this `seed`. Returns x (and y when given); the inputs are not modified. With
    Mixup and loss="sparse_categorical_crossentropy", y comes back as (n, 3) rows (label,
    partner's label, lam)."""
    if loss not in contract.LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(contract.LOSSES)}")
    dtype = np.float64 if np.asarray(X).dtype == np.float64 else np.float32
    X = as_features(X, "X", dtype=dtype)
    Y = None
    if y is not None:
        Y = np.asarray(y, dtype=X.dtype)
        Y = Y.reshape(-1, 1) if Y.ndim == 1 else Y
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {Y.shape[0]} rows but X has {X.shape[0]}")
    n = X.shape[0]
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    plan = prepare(augmenters, X.shape[1], contract.LOSSES[loss], image_shape)
    x, yy = augment_epoch(plan, X, Y, np.arange(n), batch_size, seed, step)
    if y is None:
        return x
    # 1-D y comes back 1-D, unless Mixup made sparse labels (label a, label b, lam) rows
    return x, (yy.reshape(np.shape(y)) if np.ndim(y) == 1 and yy.shape[1] == 1 else yy)


class _Draws:
    """The Philox draws of one augmenter over rows cut into batches of `batch_size`; batch b
    is training step step0 + b. Element e of a row's draws is row_in_batch * per_row + e."""

    def __init__(self, seed, step0, batch_size, n_rows, position):
        self.key = split_seed(seed)
        self.step0 = int(step0)
        self.n = int(n_rows)
        self.batch_size = max(1, min(int(batch_size), self.n))  # one batch holds at most n
        self.position = int(position)

    def _per_batch(self, stream, per_row, transform, dtype):
        """(n, per_row) of transform(words), computed a few whole batches per NumPy pass."""
        bs, n = self.batch_size, self.n
        n_batches = -(-n // bs)
        per_step = bs * per_row
        groups = -(-per_step // 4)
        out = np.empty((n_batches * bs, per_row), dtype)
        chunk = max(1, _WORDS_PER_PASS // (4 * groups))
        for b0 in range(0, n_batches, chunk):
            b1 = min(n_batches, b0 + chunk)
            counters = np.empty((b1 - b0, groups, 4), np.uint64)
            counters[..., 0] = np.arange(groups, dtype=np.uint64)[None, :]
            counters[..., 1] = ((self.step0 + np.arange(b0, b1, dtype=np.int64))
                                & MASK32).astype(np.uint64)[:, None]
            counters[..., 2] = self.position & MASK32
            counters[..., 3] = stream
            words = philox4x32_block(counters.reshape(-1, 4), self.key)
            vals = transform(words.reshape(b1 - b0, 4 * groups))
            out[b0 * bs:b1 * bs] = vals[:, :per_step].reshape(-1, per_row)
        return out[:n]

    def words(self, stream, per_row):
        return self._per_batch(stream, per_row, lambda w: w, np.uint32)

    def uniforms(self, stream, per_row):
        """Floats in (0, 1), never 0 or 1: (word + 0.5) / 2**32."""
        return self._per_batch(stream, per_row, _to_uniform, np.float64)

    def normals(self, stream, per_row):
        """Standard normals, Box-Muller on word pairs (4g, 4g+1) and (4g+2, 4g+3)."""
        return self._per_batch(stream, per_row, _box_muller, np.float64)

    def batch_permutation(self, stream):
        """A random permutation inside each batch, as row indices into the n rows."""
        keys = self.words(stream, 1)[:, 0]
        bs, n = self.batch_size, self.n
        full = n // bs * bs
        out = np.empty(n, np.int64)
        if full:
            order = np.argsort(keys[:full].reshape(-1, bs), axis=1, kind="stable")
            out[:full] = (order + np.arange(0, full, bs)[:, None]).reshape(-1)
        if full < n:
            out[full:] = full + np.argsort(keys[full:], kind="stable")
        return out


def _to_uniform(words):
    return (words.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)


def _box_muller(words):
    u = _to_uniform(words).reshape(words.shape[0], -1, 2)
    r = np.sqrt(-2.0 * np.log(u[..., 0]))
    theta = (2.0 * math.pi) * u[..., 1]
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1).reshape(words.shape)
