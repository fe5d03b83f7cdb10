"""Shared helpers for tests: random data that is never zeros, and Nets built like fit builds them."""
import numpy as np

import fastreg as fr


def fresh_rng():
    """A generator seeded from the OS: every run sees new inputs."""
    return np.random.default_rng()


def randn(rng, shape, dtype=np.float32, scale=1.0):
    a = rng.standard_normal(shape) * scale
    a[a == 0] = 0.5
    return a.astype(dtype)


def make_model(sizes=(5, 7, 6, 3), activation="tanh", dropout=0.2, regularizer=None,
               loss="mse", optimizer=None, input_dropout=0.0, dtype="float32", seed=3,
               backend="numpy"):
    layers = [fr.Dropout(input_dropout)] if input_dropout else []
    for units in sizes[1:-1]:
        layers.append(fr.Dense(units, activation, dropout=dropout, regularizer=regularizer))
    layers.append(fr.Dense(sizes[-1], regularizer=regularizer))
    model = fr.Sequential(layers, input_dim=sizes[0], seed=seed, dtype=dtype)
    model.compile(loss=loss, optimizer=optimizer or fr.Adam(1e-2), backend=backend)
    return model


def make_data(rng, n, sizes, loss, dtype=np.float32):
    X = randn(rng, (n, sizes[0]), dtype)
    if loss == "sparse_categorical_crossentropy":
        y = rng.integers(0, sizes[-1], n)
    elif loss == "binary_crossentropy":
        y = rng.random((n, sizes[-1])).astype(dtype)
    else:
        y = randn(rng, (n, sizes[-1]), dtype)
    return X, y
