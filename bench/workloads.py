"""Built-in benchmark workloads, shared by ``fastreg bench``, the peer engines and the
pytest-benchmark suites. Everything is generated from a seed with NumPy's ``default_rng``;
nothing is downloaded (``digits`` reads the copy of the UCI digits bundled in bench/data, the
same 1,797 images scikit-learn ships, so it needs no scikit-learn).

Shape legend: n samples, d input features, B batch, I fan_in, O fan_out.

- ``curve``  1-D regression from the regularization study: y = a normalized sum of a few
             random sinusoids + Gaussian noise; 1 -> 64 -> 64 -> 64 -> 1, leaky_relu,
             dropout 0.1, L2 1e-4, Adam 1e-3, batch 128, mse. 10,000 train / 2,000 val.
- ``wide``   784 -> 1024 -> 1024 -> 10 classifier, relu, dropout 0.2, L2 1e-4, Adam 1e-3,
             batch 256; standard-normal features labelled by the argmax of a fixed random
             teacher MLP; 16,384 train (quick: 4,096) / 2,048 val. The GEMM-bound one.
- ``digits`` the 8x8 digits scaled to [0, 1], seeded stratified 80/20 split;
             64 -> 128 -> 10, relu, dropout 0.2, L2 1e-4, Adam 1e-3, batch 64.

``quick`` keeps every workload's shape and data (except ``wide``'s training-set size) and
lowers the number of timed epochs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

WORKLOADS = ("curve", "wide", "digits")


@dataclass
class Workload:
    name: str
    X_train: np.ndarray          # float32 (n, d)
    y_train: np.ndarray          # float32 (n, 1) regression; int64 (n,) class labels
    X_val: np.ndarray
    y_val: np.ndarray
    layers: list                 # [(units, activation, dropout), ...]; output layer last
    loss: str                    # "mse" | "sparse_categorical_crossentropy"
    l2: float
    lr: float
    batch_size: int
    epochs: int
    seed: int
    description: str = field(default="", compare=False)

    # ------------------------------------------------------------ derived facts
    @property
    def input_dim(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_outputs(self) -> int:
        return int(self.layers[-1][0])

    @property
    def is_classification(self) -> bool:
        return self.loss == "sparse_categorical_crossentropy"

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    def layer_dims(self) -> list:
        """[(I, O), ...] for every dense layer, input layer first."""
        dims, fan_in = [], self.input_dim
        for units, _act, _rate in self.layers:
            dims.append((fan_in, int(units)))
            fan_in = int(units)
        return dims

    def batch_sizes(self) -> list:
        """The sizes of one epoch's batches; the last partial batch is kept."""
        full, rest = divmod(self.n_train, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    def n_batches(self) -> int:
        return -(-self.n_train // self.batch_size)

    def gemm_shapes(self, batch) -> list:
        """(m, k, n) of every GEMM in one training step on a batch of ``batch`` rows.

        Forward ``x @ W`` is (B, I, O); backward ``dW = x.T @ dz`` is (I, B, O) and
        ``dx = dz @ W.T`` is (B, O, I), the latter skipped for the first layer (nobody needs
        the gradient of the input data).
        """
        B = int(batch)
        shapes = [(B, I, O) for I, O in self.layer_dims()]
        for li, (I, O) in reversed(list(enumerate(self.layer_dims()))):
            shapes.append((I, B, O))
            if li > 0:
                shapes.append((B, O, I))
        return shapes

    def flops_per_step(self, batch) -> float:
        return float(sum(2 * m * k * n for m, k, n in self.gemm_shapes(batch)))

    def flops_per_epoch(self) -> float:
        """2 x multiply-adds of every GEMM of forward and backward over one epoch's batches,
        the last partial batch included. Elementwise work (activations, dropout, loss, the
        optimizer) is not counted: it is O(B*O), the GEMMs are O(B*I*O)."""
        full, rest = divmod(self.n_train, self.batch_size)
        total = full * self.flops_per_step(self.batch_size)
        if rest:
            total += self.flops_per_step(rest)
        return float(total)

    def param_count(self) -> int:
        return int(sum(I * O + O for I, O in self.layer_dims()))

    def summary(self) -> str:
        dims = " -> ".join([str(self.input_dim)] + [str(u) for u, _, _ in self.layers])
        hidden = self.layers[:-1]
        act = hidden[0][1] if hidden else "linear"
        rate = hidden[0][2] if hidden else 0.0
        return (f"{self.name}: {dims} {act}, dropout {rate:g}, L2 {self.l2:g}, Adam {self.lr:g}, "
                f"batch {self.batch_size}, {self.n_train} train / {self.X_val.shape[0]} val, "
                f"{self.loss}, {self.flops_per_epoch() / 1e9:.3g} GFLOP/epoch")


# ---------------------------------------------------------------- generators
def _curve(quick, seed):
    rng = np.random.default_rng(seed)
    k = 4
    amp = rng.uniform(0.5, 1.5, k)
    freq = rng.uniform(1.0, 5.0, k)          # radians per unit of x
    phase = rng.uniform(0.0, 2.0 * math.pi, k)
    lo, hi = -2.0, 2.0

    def f(x):
        return (amp * np.sin(np.outer(x, freq) + phase)).sum(axis=1)

    # Normalize with the function's own mean/std on a fine grid, so that train and val share
    # one target function whatever their sizes; the clean target then has variance 1.
    grid = f(np.linspace(lo, hi, 20001))
    mu, sd = grid.mean(), grid.std()
    noise = 0.1

    def draw(n):
        x = rng.uniform(lo, hi, n)
        y = (f(x) - mu) / sd + noise * rng.standard_normal(n)
        return x.reshape(-1, 1).astype(np.float32), y.reshape(-1, 1).astype(np.float32)

    X_train, y_train = draw(10_000)
    X_val, y_val = draw(2_000)
    return Workload(
        name="curve", X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val,
        layers=[(64, "leaky_relu", 0.1), (64, "leaky_relu", 0.1), (64, "leaky_relu", 0.1),
                (1, None, 0.0)],
        loss="mse", l2=1e-4, lr=1e-3, batch_size=128, epochs=5 if quick else 20, seed=seed,
        description="1-D regression: normalized sum of 4 random sinusoids + N(0, 0.1^2) noise "
                    "(the best achievable validation mse is about 0.01)",
    )


def _wide(quick, seed):
    rng = np.random.default_rng(seed)
    d, h, c = 784, 256, 10
    # Teacher: a fixed random tanh MLP; its logits are centred per class on a reference sample
    # so that the ten classes are roughly balanced.
    A = rng.standard_normal((d, h), dtype=np.float32) / np.float32(math.sqrt(d))
    Bm = rng.standard_normal((h, c), dtype=np.float32) / np.float32(math.sqrt(h))

    def logits(X):
        return np.tanh(X @ A) @ Bm

    centre = logits(rng.standard_normal((4096, d), dtype=np.float32)).mean(axis=0)

    def draw(n):
        X = rng.standard_normal((n, d), dtype=np.float32)
        y = np.argmax(logits(X) - centre, axis=1)
        return X, y.astype(np.int64)

    # Validation drawn before training so that quick and full runs share it.
    X_val, y_val = draw(2048)
    X_train, y_train = draw(4096 if quick else 16_384)
    return Workload(
        name="wide", X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val,
        layers=[(1024, "relu", 0.2), (1024, "relu", 0.2), (10, None, 0.0)],
        loss="sparse_categorical_crossentropy", l2=1e-4, lr=1e-3, batch_size=256,
        epochs=3 if quick else 5, seed=seed,
        description="standard-normal features labelled by the argmax of a random 784-256-10 "
                    "tanh teacher",
    )


DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")


def load_digits():
    """(X, y) of the bundled UCI 8x8 digits (bench/data/README.md): X (1797, 64) float32 in
    [0, 1] (pixel counts 0..16 divided by 16), y (1797,) int64 labels 0..9."""
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        return (data["X"].astype(np.float32) / np.float32(16.0)), data["y"].astype(np.int64)


def stratified_split(y, test_fraction, seed):
    """(train indices, test indices): each class split in the same proportion, seeded; both
    index lists sorted. The test share of class c is round(test_fraction * n_c)."""
    rng = np.random.default_rng([int(seed), 20])
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test.append(rng.permutation(members)[:int(round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def _digits(quick, seed):
    X, y = load_digits()
    tr, va = stratified_split(y, 0.2, seed)
    return Workload(
        name="digits",
        X_train=np.ascontiguousarray(X[tr]), y_train=np.ascontiguousarray(y[tr]),
        X_val=np.ascontiguousarray(X[va]), y_val=np.ascontiguousarray(y[va]),
        layers=[(128, "relu", 0.2), (10, None, 0.0)],
        loss="sparse_categorical_crossentropy", l2=1e-4, lr=1e-3, batch_size=64,
        epochs=5 if quick else 20, seed=seed,
        description="the UCI 8x8 digits (bundled) scaled to [0, 1], stratified 80/20 split",
    )


_MAKERS = {"curve": _curve, "wide": _wide, "digits": _digits}


def make_workload(name, quick=False, seed=0) -> Workload:
    """Build the named workload; the same (name, quick, seed) always gives the same arrays."""
    try:
        maker = _MAKERS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") \
            from None
    return maker(bool(quick), int(seed))


def initial_weights(workload, seed=0) -> list:
    """[W0, b0, W1, b1, ...]: Glorot-uniform W of shape (fan_in, fan_out), zero b, float32.

    Every engine of a benchmark starts from these same arrays (each copies them in).
    """
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in workload.layer_dims():
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        out.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))
        out.append(np.zeros(fan_out, dtype=np.float32))
    return out
