"""The same model, the same weights, trained in fastreg and in PyTorch: the same trajectory.

Skips cleanly without PyTorch. Dropout is off (PyTorch's masks come from its own generator);
mask parity across fastreg's backends is tested elsewhere.
"""
import numpy as np
import pytest

import fastreg as fr

from netutil import fresh_rng, randn

torch = pytest.importorskip("torch")

SIZES = (5, 16, 12, 3)
STEPS_PER_EPOCH, EPOCHS, BATCH = 4, 2, 16


def _torch_model(weights, act):
    layers = []
    n = len(weights) // 2
    for i in range(n):
        W, b = weights[2 * i], weights[2 * i + 1]
        lin = torch.nn.Linear(*W.shape, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < n - 1:
            layers.append(torch.nn.Tanh() if act == "tanh" else torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


CASES = {
    "sgd-momentum-l2": (lambda: fr.SGD(0.05, momentum=0.9), fr.L2(1e-2),
                        lambda w, b: torch.optim.SGD([{"params": w, "weight_decay": 1e-2},
                                                      {"params": b}], lr=0.05, momentum=0.9)),
    "sgd-nesterov-l2": (lambda: fr.SGD(0.05, momentum=0.9, nesterov=True), fr.L2(1e-2),
                        lambda w, b: torch.optim.SGD([{"params": w, "weight_decay": 1e-2},
                                                      {"params": b}], lr=0.05, momentum=0.9,
                                                     nesterov=True)),
    "adam-l2": (lambda: fr.Adam(1e-2), fr.L2(1e-2),
                lambda w, b: torch.optim.Adam([{"params": w, "weight_decay": 1e-2},
                                               {"params": b}], lr=1e-2)),
    "adamw": (lambda: fr.AdamW(1e-2, weight_decay=0.1), None,
              lambda w, b: torch.optim.AdamW([{"params": w, "weight_decay": 0.1},
                                              {"params": b, "weight_decay": 0.0}], lr=1e-2)),
    "sgd-l1-subgradient": (lambda: fr.SGD(0.05), fr.L1(1e-2, proximal=False),
                           lambda w, b: torch.optim.SGD([{"params": w}, {"params": b}], lr=0.05)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("loss", ["mse", "sparse_categorical_crossentropy"])
def test_weights_follow_pytorch(case, loss):
    make_opt, reg, make_torch_opt = CASES[case]
    rng = fresh_rng()
    n = STEPS_PER_EPOCH * BATCH
    X = randn(rng, (n, SIZES[0]))
    if loss == "mse":
        y = randn(rng, (n, SIZES[-1]))
    else:
        y = rng.integers(0, SIZES[-1], n)
    model = fr.Sequential([fr.Dense(SIZES[1], "tanh", regularizer=reg),
                           fr.Dense(SIZES[2], "tanh", regularizer=reg),
                           fr.Dense(SIZES[3], regularizer=reg)], input_dim=SIZES[0], seed=1)
    model.compile(loss=loss, optimizer=make_opt(), backend="numba")
    tmodel = _torch_model(model.get_weights(), "tanh")
    weights = [m.weight for m in tmodel if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in tmodel if isinstance(m, torch.nn.Linear)]
    topt = make_torch_opt(weights, biases)
    criterion = torch.nn.MSELoss() if loss == "mse" else torch.nn.CrossEntropyLoss()
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y) if loss == "mse" else torch.from_numpy(y.astype(np.int64))
    for _ in range(EPOCHS):
        for s in range(STEPS_PER_EPOCH):
            sl = slice(s * BATCH, (s + 1) * BATCH)
            topt.zero_grad()
            out = criterion(tmodel(Xt[sl]), yt[sl])
            if case == "sgd-l1-subgradient":
                out = out + 1e-2 * sum(w.abs().sum() for w in weights)
            out.backward()
            topt.step()
    model.fit(X, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0)
    ours = model.get_weights()
    for i, (w, b) in enumerate(zip(weights, biases)):
        np.testing.assert_allclose(ours[2 * i], w.detach().numpy().T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[2 * i + 1], b.detach().numpy(), rtol=1e-5, atol=1e-6)
