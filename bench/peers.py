"""Peer engines that ``fastreg bench`` times against fastreg's own backends.

Each engine trains one :class:`~bench.workloads.Workload` from given initial weights with the
workload's hyperparameters, one epoch per ``run_epoch`` call, so that a runner can interleave
engines (A B A B ...) in one process and compare medians. Importing this module never imports
a peer library; ``Engine.available()`` says whether a peer can run and how to install it.

What every engine shares, so that the comparison is about speed and not about the recipe:
- the same initial weights (copied in), the same batches: each engine draws its epoch
  permutation from its own ``np.random.default_rng(workload.seed)``, so engines see the same
  shuffled batches in the same order; the last partial batch is kept;
- Adam (lr, betas 0.9/0.999, eps 1e-8) with the L2 penalty coupled to the gradient on the
  weights only (gradient + l2*W, PyTorch's ``weight_decay`` on the weight param group);
- inverted dropout with drop probability ``rate`` where the peer has dropout;
- ``train_loss`` is the sample-weighted mean data loss (no penalty) over the last epoch's
  batches, each measured with the weights of its own step (the number a training loop logs);
  ``val_loss`` and ``val_accuracy`` are computed in inference mode (no dropout).

A runner should time a warm-up epoch apart: PyTorch builds its kernels' caches on the first
batches and JAX compiles its jitted epoch and partial-batch step on their first call.
"""
from __future__ import annotations

import importlib
import os

import numpy as np

__all__ = ["Engine", "TorchEngine", "TorchCudaEngine", "JaxEngine", "SklearnEngine", "PEERS", "get_engine",
           "measure_torch_kept_bytes", "measure_jax_kept_bytes"]


def _missing(modules, hint):
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:      # ImportError, or a broken install raising anything
            return False, f"{mod} is not usable ({type(exc).__name__}: {exc}); {hint}"
    return True, ""


class Engine:
    """Interface shared by the peers (see the module docstring for the shared recipe)."""

    name = "engine"
    kept_bytes_per_element: float = float("nan")
    notes: str = ""

    @staticmethod
    def available():
        return False, "abstract engine"

    def __init__(self, workload, weights, threads: int):
        self.workload = workload
        self.threads = int(threads)
        self._rng = np.random.default_rng(workload.seed)
        self._epochs = 0
        self._train_loss = float("nan")
        ws = [np.array(w, dtype=np.float32, copy=True) for w in weights]
        dims = workload.layer_dims()
        if len(ws) != 2 * len(dims):
            raise ValueError(f"expected {2 * len(dims)} weight arrays [W0, b0, ...], got {len(ws)}")
        for i, (I, O) in enumerate(dims):
            if ws[2 * i].shape != (I, O) or ws[2 * i + 1].shape != (O,):
                raise ValueError(f"layer {i}: expected W {(I, O)} and b {(O,)}, got "
                                 f"{ws[2 * i].shape} and {ws[2 * i + 1].shape}")
        self._init_weights = ws

    def _next_permutation(self):
        return self._rng.permutation(self.workload.n_train)

    def run_epoch(self) -> None:
        raise NotImplementedError

    def train_loss(self) -> float:
        return self._train_loss

    def val_loss(self) -> float:
        raise NotImplementedError

    def val_accuracy(self):
        raise NotImplementedError

    def get_weights(self) -> list:
        """[W0, b0, ...] as float32 NumPy arrays, W of shape (fan_in, fan_out)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.workload.name} threads={self.threads}>"


# =============================================================== PyTorch (eager, CPU)
class TorchEngine(Engine):
    """PyTorch eager on CPU: nn.Linear / nn.ReLU or nn.LeakyReLU(0.01) / nn.Dropout,
    torch.optim.Adam with ``weight_decay=l2`` on the weight param group only (biases 0),
    nn.MSELoss / nn.CrossEntropyLoss, ``torch.set_num_threads(threads)`` (re-applied at every
    epoch, since the setting is process-wide)."""

    name = "torch"
    # Measured by measure_torch_kept_bytes() (torch 2.13, CPU): autograd's saved tensors of
    # Linear -> ReLU|LeakyReLU -> Dropout -> Linear, deduplicated by storage, parameters and the
    # network input excluded, divided by B*O. ReLU keeps its float32 output (LeakyReLU its
    # float32 input) = 4; on CPU nn.Dropout is not the fused native_dropout (bool mask, 1 byte,
    # the CUDA path: 9 bytes in all) but input * noise, which keeps the float32 noise = 4;
    # the next Linear keeps the float32 dropout output = 4: 12 bytes per activation element.
    kept_bytes_per_element = 12.0
    notes = "PyTorch eager, CPU; dropout with torch's own RNG (masks differ from fastreg's)"

    @staticmethod
    def available():
        return _missing(["torch"], "pip install torch")

    def __init__(self, workload, weights, threads):
        super().__init__(workload, weights, threads)
        import torch
        from torch import nn
        self._torch = torch
        torch.set_num_threads(self.threads)
        torch.manual_seed(workload.seed)
        mods, linears = [], []
        fan_in = workload.input_dim
        for i, (units, act, rate) in enumerate(workload.layers):
            lin = nn.Linear(fan_in, units)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(self._init_weights[2 * i].T.copy()))
                lin.bias.copy_(torch.from_numpy(self._init_weights[2 * i + 1]))
            mods.append(lin)
            linears.append(lin)
            if act == "relu":
                mods.append(nn.ReLU())
            elif act == "leaky_relu":
                mods.append(nn.LeakyReLU(0.01))
            elif act is not None:
                raise ValueError(f"torch engine: unsupported activation {act!r}")
            if rate > 0:
                mods.append(nn.Dropout(rate))
            fan_in = units
        self.model = nn.Sequential(*mods)
        self._linears = linears
        self.optimizer = torch.optim.Adam(
            [{"params": [m.weight for m in linears], "weight_decay": workload.l2},
             {"params": [m.bias for m in linears], "weight_decay": 0.0}],
            lr=workload.lr, betas=(0.9, 0.999), eps=1e-8)
        self.loss_fn = nn.CrossEntropyLoss() if workload.is_classification else nn.MSELoss()
        self._X = torch.from_numpy(np.ascontiguousarray(workload.X_train, dtype=np.float32))
        self._y = torch.from_numpy(np.ascontiguousarray(workload.y_train))
        self._Xv = torch.from_numpy(np.ascontiguousarray(workload.X_val, dtype=np.float32))
        self._yv = torch.from_numpy(np.ascontiguousarray(workload.y_val))

    def run_epoch(self):
        torch = self._torch
        torch.set_num_threads(self.threads)
        perm = torch.as_tensor(self._next_permutation())
        X, y = self._X[perm], self._y[perm]          # one gather per epoch, then views
        n, B = X.shape[0], self.workload.batch_size
        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=X.device)
        for s in range(0, n, B):
            xb, yb = X[s:s + B], y[s:s + B]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach() * xb.shape[0]
        self._train_loss = float(total) / n
        self._epochs += 1

    def _val_out(self):
        torch = self._torch
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(self._Xv)
        finally:
            self.model.train()

    def val_loss(self):
        out = self._val_out()
        return float(self.loss_fn(out, self._yv))

    def val_accuracy(self):
        if not self.workload.is_classification:
            return None
        return float((self._val_out().argmax(dim=1) == self._yv).double().mean())

    def get_weights(self):
        out = []
        for lin in self._linears:
            out += [lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()]
        return out


class TorchCudaEngine(TorchEngine):
    """PyTorch eager on the GPU (device "cuda"): the CPU engine's model, optimizer and loop
    with the parameters and the data on the device; the epoch ends with a synchronize, so its
    time is the device's. Unavailable without a CUDA build of torch and a GPU."""

    name = "torch-cuda"
    # An estimate, not a measurement (measure_torch_kept_bytes runs on the CPU): on CUDA,
    # nn.Dropout is the fused native_dropout, which keeps a bool mask: 4 (ReLU output) + 1
    # + 4 (the next Linear's input).
    kept_bytes_per_element = 9.0
    notes = ("PyTorch eager, CUDA; dropout with torch's own RNG (masks differ from fastreg's); "
             "B/el estimated from native_dropout's bool mask, not measured")

    @staticmethod
    def available():
        ok, why = _missing(["torch"], "pip install torch")
        if not ok:
            return ok, why
        import torch
        if not torch.cuda.is_available():
            return False, (f"torch {torch.__version__} sees no CUDA GPU (a CPU build, or no "
                           f"device here)")
        return True, ""

    def __init__(self, workload, weights, threads):
        super().__init__(workload, weights, threads)
        torch = self._torch
        dev = torch.device("cuda")
        self.model.to(dev)      # in place: the optimizer's parameters are these tensors
        self._X, self._y = self._X.to(dev), self._y.to(dev)
        self._Xv, self._yv = self._Xv.to(dev), self._yv.to(dev)
        self._dev = dev

    def _next_permutation(self):
        return self._torch.from_numpy(super()._next_permutation()).to(self._dev)

    def run_epoch(self):
        super().run_epoch()     # float(total) at its end waits for the device
        self._torch.cuda.synchronize()

    def get_weights(self):
        out = []
        for lin in self._linears:
            out += [lin.weight.detach().cpu().numpy().T.copy(),
                    lin.bias.detach().cpu().numpy().copy()]
        return out


def measure_torch_kept_bytes(activation="relu", rate=0.2, B=64, I=32, O=48):
    """Bytes autograd keeps per element of a (B, O) Linear -> activation -> Dropout layer.

    Counts every tensor saved for backward (saved_tensors_hooks) in Linear(I, O) -> act ->
    Dropout(rate) -> Linear(O, 1), deduplicated by storage, excluding the parameters and the
    network input, and divides by B*O (the next Linear's saved input is the dropout output,
    which this layer's backward would otherwise have to keep)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    act = nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.01)
    net = nn.Sequential(nn.Linear(I, O), act, nn.Dropout(rate), nn.Linear(O, 1))
    x = torch.randn(B, I)
    skip = {p.untyped_storage().data_ptr() for p in net.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()
        out = net(x).sum()
    del out
    return sum(saved.values()) / (B * O)


# =============================================================== JAX (jit + lax.scan, CPU)
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _jax_backend_started():
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:
        return True     # cannot tell: assume flags can no longer change


class JaxEngine(Engine):
    """JAX on CPU: the whole training step under ``jax.jit``, an epoch's full batches under one
    ``lax.scan`` (indices gathered on the device), the last partial batch through a separate
    jitted step; both compiled on their first call (the runner's warm-up epoch). optax
    ``chain(add_decayed_weights(l2, mask=weights only), adam(lr))``: adds l2*W to the
    gradient before Adam's moments, exactly PyTorch's Adam ``weight_decay`` (coupled L2);
    optax's adam puts eps after the square root of the bias-corrected second moment, as
    PyTorch does. Dropout masks from ``jax.random.bernoulli`` with a key folded from
    (seed, step, layer).

    Threads: XLA's CPU client sizes its thread pools when the backend starts and offers no
    per-call limit. threads == 1 sets XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1" before the backend starts (the long-standing recipe of
    jax issues #743/#1539), but with jax 0.10.2 per-thread CPU accounting of a jitted matmul
    loop showed the work still spread over 4 threads with or without it: XLA's CPU runtime
    has its own pool. Only CPU affinity (``taskset -c 0``, process-wide) truly confines JAX,
    so a runner that wants honest single-thread numbers must pin the whole process.
    threads > 1 leaves XLA on its default (every core the process may use). ``notes`` says
    which applied.
    """

    name = "jax"
    # Measured by measure_jax_kept_bytes(): the residuals of jax.vjp for
    # x @ W + b -> relu|leaky_relu -> dropout (jax.random.bernoulli + where) -> next matmul,
    # counting the (B, O)-shaped ones that are not broadcast constants: the activation's
    # derivative as a bool (z > 0) = 1, the dropout keep mask as a bool = 1, the dropout
    # output kept by the next matmul = 4: 6 bytes per element. Under jit XLA may fuse or
    # recompute elementwise producers further: this is what JAX asks XLA to keep.
    kept_bytes_per_element = 6.0
    notes = "jit + lax.scan, CPU; dropout via jax.random (threefry)"

    @staticmethod
    def available():
        return _missing(["jax", "jaxlib", "optax"], "pip install jax jaxlib optax")

    def __init__(self, workload, weights, threads):
        super().__init__(workload, weights, threads)
        notes = [type(self).notes]
        ncores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count())
        if self.threads == 1:
            if "xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
                pass
            elif _jax_backend_started():
                notes.append("threads=1 asked but the JAX backend had already started")
            else:
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                           + _XLA_ONE_THREAD).strip()
            notes.append(f"threads=1: XLA_FLAGS {_XLA_ONE_THREAD!r} set, but jax 0.10's XLA CPU "
                         f"runtime was measured to still spread work over its own pool; only "
                         f"pinning the process (taskset -c 0) confines it to one core")
        else:
            notes.append(f"XLA's own thread pool, sized to the {ncores} cores the process may "
                         f"use; threads={self.threads} is not imposed")
        self.notes = "; ".join(notes)

        import jax
        import jax.numpy as jnp
        import optax
        self._jax, self._jnp = jax, jnp
        cpu = jax.devices("cpu")[0]
        self._cpu = cpu
        put = lambda a: jax.device_put(a, cpu)  # noqa: E731

        wl = workload
        ws = self._init_weights
        self.params = [{"W": put(ws[2 * i]), "b": put(ws[2 * i + 1])} for i in range(len(wl.layers))]
        mask = [{"W": True, "b": False} for _ in wl.layers]
        self.tx = optax.chain(optax.add_decayed_weights(wl.l2, mask=mask),
                              optax.adam(wl.lr, b1=0.9, b2=0.999, eps=1e-8))
        # committed to the device like the params, or the second epoch recompiles (optax's
        # step count starts uncommitted, and comes back committed from the first epoch)
        self.opt_state = put(self.tx.init(self.params))
        self._X = put(np.ascontiguousarray(wl.X_train, dtype=np.float32))
        # labels as int32: JAX runs without x64 and would otherwise warn and truncate
        ydt = np.int32 if wl.is_classification else np.float32
        self._y = put(np.ascontiguousarray(wl.y_train, dtype=ydt))
        self._Xv = put(np.ascontiguousarray(wl.X_val, dtype=np.float32))
        self._yv = put(np.ascontiguousarray(wl.y_val, dtype=ydt))
        self._key = jax.random.key(wl.seed)
        layers = [(a, float(r)) for _, a, r in wl.layers]
        classification = wl.is_classification
        tx = self.tx

        def forward(params, x, key, train):
            h = x
            for i, (p, (act, rate)) in enumerate(zip(params, layers)):
                h = h @ p["W"] + p["b"]
                if act == "relu":
                    h = jax.nn.relu(h)
                elif act == "leaky_relu":
                    h = jax.nn.leaky_relu(h, 0.01)
                elif act is not None:
                    raise ValueError(f"jax engine: unsupported activation {act!r}")
                if train and rate > 0.0:
                    keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, h.shape)
                    h = jnp.where(keep, h / (1.0 - rate), 0.0)
            return h

        def data_loss(out, y):
            if classification:
                return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
            return jnp.mean((out - y) ** 2)

        def loss_fn(params, x, y, key):
            return data_loss(forward(params, x, key, True), y)

        grad_fn = jax.value_and_grad(loss_fn)

        def train_step(params, opt_state, x, y, key):
            loss, grads = grad_fn(params, x, y, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        B = wl.batch_size
        n_full, rest = divmod(wl.n_train, B)
        self._n_full, self._rest = n_full, rest

        def epoch_full(params, opt_state, X, Y, idx, key, step0):
            Xs = jnp.take(X, idx, axis=0).reshape((n_full, B) + X.shape[1:])
            Ys = jnp.take(Y, idx, axis=0).reshape((n_full, B) + Y.shape[1:])

            def body(carry, batch):
                params, opt_state, total = carry
                xb, yb, i = batch
                params, opt_state, loss = train_step(params, opt_state, xb, yb,
                                                     jax.random.fold_in(key, step0 + i))
                return (params, opt_state, total + loss * B), None

            (params, opt_state, total), _ = jax.lax.scan(
                body, (params, opt_state, jnp.zeros((), jnp.float32)),
                (Xs, Ys, jnp.arange(n_full, dtype=jnp.int32)))
            return params, opt_state, total

        def step_partial(params, opt_state, X, Y, idx, key, step):
            params, opt_state, loss = train_step(params, opt_state, jnp.take(X, idx, axis=0),
                                                 jnp.take(Y, idx, axis=0),
                                                 jax.random.fold_in(key, step))
            return params, opt_state, loss * idx.shape[0]

        def val_out(params, X):
            return forward(params, X, None, False)

        def val_metrics(params, X, Y):
            out = val_out(params, X)
            acc = (jnp.argmax(out, axis=1) == Y).mean() if classification else jnp.zeros(())
            return data_loss(out, Y), acc

        # Compiled on first use, so that a runner's warm-up epoch carries JAX's compile time
        # as it carries Numba's and PyTorch's first-call costs.
        self._epoch_full = jax.jit(epoch_full, donate_argnums=(0, 1)) if n_full else None
        self._step_partial = jax.jit(step_partial, donate_argnums=(0, 1)) if rest else None
        self._val = jax.jit(val_metrics)
        self._step = 0

    def run_epoch(self):
        jnp = self._jnp
        perm = self._next_permutation().astype(np.int32)
        B = self.workload.batch_size
        cut = self._n_full * B
        total = 0.0
        if self._epoch_full is not None:
            self.params, self.opt_state, t = self._epoch_full(
                self.params, self.opt_state, self._X, self._y, perm[:cut], self._key,
                jnp.int32(self._step))
            self._step += self._n_full
            total = t
        if self._step_partial is not None:
            self.params, self.opt_state, t = self._step_partial(
                self.params, self.opt_state, self._X, self._y, perm[cut:], self._key,
                jnp.int32(self._step))
            self._step += 1
            total = total + t
        self._jax.block_until_ready(self.params)
        self._train_loss = float(total) / self.workload.n_train
        self._epochs += 1

    def val_loss(self):
        loss, _ = self._val(self.params, self._Xv, self._yv)
        return float(loss)

    def val_accuracy(self):
        if not self.workload.is_classification:
            return None
        _, acc = self._val(self.params, self._Xv, self._yv)
        return float(acc)

    def get_weights(self):
        out = []
        for p in self.params:
            out += [np.asarray(p["W"]), np.asarray(p["b"])]
        return out


def measure_jax_kept_bytes(activation="relu", rate=0.2, B=64, I=32, O=48):
    """Bytes JAX's autodiff keeps per element of a (B, O) dense -> activation -> dropout layer
    followed by the next layer's matmul.

    The residuals are the array leaves of the ``jax.vjp`` closure (what
    ``jax.ad_checkpoint.print_saved_residuals`` lists); we count the (B, O)-shaped ones and
    skip those that are a broadcast constant (the zeros that the jvp rules of relu and where
    carry along, which XLA folds and never stores)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, I)), jnp.float32)
    key = jax.random.key(0)

    def f(W, b, W2):
        h = x @ W + b
        h = jax.nn.relu(h) if activation == "relu" else jax.nn.leaky_relu(h, 0.01)
        keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
        return (h @ W2).sum()

    args = (jnp.asarray(rng.standard_normal((I, O)), jnp.float32),
            jnp.asarray(rng.standard_normal(O), jnp.float32),
            jnp.asarray(rng.standard_normal((O, 1)), jnp.float32))
    _, vjp = jax.vjp(f, *args)
    total = 0
    for leaf in jax.tree_util.tree_leaves(vjp):
        if getattr(leaf, "shape", None) != (B, O):
            continue
        a = np.asarray(leaf)
        if a.size and (a == a.flat[0]).all():
            continue            # a broadcast constant, not kept memory
        total += a.size * a.dtype.itemsize
    return total / (B * O)


# =============================================================== scikit-learn (NumPy, CPU)
class SklearnEngine(Engine):
    """scikit-learn's MLPRegressor / MLPClassifier, solver="adam", one epoch per
    ``partial_fit`` on the epoch's shuffled copy of the data (shuffle=False inside sklearn, so
    the batches are the same as the other engines').

    Penalty: sklearn minimizes, per batch of b rows, L_sk + alpha/(2b)*sum(W^2) with gradient
    dL_sk + (alpha/b)*W, where L_sk is half the MSE for regression (gradient (p - y)/b for one
    output) and the mean cross-entropy for classification. fastreg minimizes L + l2/2*sum(W^2)
    with gradient dL + l2*W. Adam is invariant to a constant factor on the gradient (up to
    eps), so the two agree when the sklearn gradient is a multiple of ours:
        regression (mse):        alpha = l2 * batch_size / 2   (sklearn's objective = ours / 2)
        classification (CE):     alpha = l2 * batch_size
    exact on full batches; on the last partial batch (b < batch_size) sklearn's penalty is
    batch_size/b times stronger. Its Adam puts eps before the bias correction of the second
    moment (eps*sqrt(1 - beta2^t) in PyTorch's terms), a negligible difference.

    Threads: its BLAS (NumPy's OpenBLAS) is limited to ``threads`` with threadpoolctl during
    each epoch and evaluation.
    """

    name = "sklearn"
    # From sklearn's source (_forward_pass, _backprop): the forward keeps one array per layer,
    # activations[i + 1] = act(x @ W + b) in the data's dtype (float32 here); backward takes
    # the relu derivative in place from it and has no dropout: 4 bytes per element.
    kept_bytes_per_element = 4.0
    notes = "no dropout; relu instead of leaky_relu"

    @staticmethod
    def available():
        return _missing(["sklearn"], "pip install scikit-learn")

    @staticmethod
    def alpha_for(workload) -> float:
        """sklearn's ``alpha`` equal to the workload's L2 (see the class docstring)."""
        if workload.is_classification:
            return workload.l2 * workload.batch_size
        return workload.l2 * workload.batch_size / 2.0

    def __init__(self, workload, weights, threads):
        super().__init__(workload, weights, threads)
        import warnings

        from sklearn.neural_network import MLPClassifier, MLPRegressor
        from threadpoolctl import ThreadpoolController
        self._controller = ThreadpoolController()
        wl = workload
        acts = {a for _, a, _ in wl.layers[:-1]}
        notes = ["no dropout" if any(r > 0 for _, _, r in wl.layers) else "",
                 "relu instead of leaky_relu (sklearn has none)" if "leaky_relu" in acts else ""]
        self.notes = "; ".join(n for n in notes if n) or "sklearn MLP, adam"
        self.alpha = self.alpha_for(wl)
        kw = dict(hidden_layer_sizes=tuple(u for u, _, _ in wl.layers[:-1]), activation="relu",
                  solver="adam", alpha=self.alpha, batch_size=wl.batch_size,
                  learning_rate_init=wl.lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                  shuffle=False, random_state=wl.seed, tol=0.0, n_iter_no_change=10**9,
                  early_stopping=False, max_iter=1)
        self.model = MLPClassifier(**kw) if wl.is_classification else MLPRegressor(**kw)
        X = np.ascontiguousarray(wl.X_train, dtype=np.float32)
        self._X = X
        self._y = wl.y_train if wl.is_classification else wl.y_train.ravel()
        self._classes = np.arange(wl.n_outputs) if wl.is_classification else None
        # One tiny partial_fit allocates coefs_/intercepts_, then ours overwrite them in place
        # (sklearn's optimizer holds references to these very arrays) and the optimizer state
        # is dropped so that the first epoch starts a fresh Adam.
        with warnings.catch_warnings(), self._limit():
            warnings.simplefilter("ignore")
            self._partial_fit(X[:2], self._y[:2])
        for i in range(len(wl.layers)):
            W, b = self._init_weights[2 * i], self._init_weights[2 * i + 1]
            self.model.coefs_[i] = np.array(W, dtype=X.dtype, copy=True)
            self.model.intercepts_[i] = np.array(b, dtype=X.dtype, copy=True)
        for attr in ("_optimizer", "best_loss_"):
            if hasattr(self.model, attr):
                delattr(self.model, attr)
        self.model.loss_curve_ = []
        self.model.t_ = 0
        self.model.n_iter_ = 0
        self.model._no_improvement_count = 0
        self.model.best_loss_ = np.inf
        self._wrap_backprop()

    def _limit(self):
        return self._controller.limit(limits=self.threads, user_api="blas")

    def _partial_fit(self, X, y):
        if self._classes is not None:
            self.model.partial_fit(X, y, classes=self._classes)
        else:
            self.model.partial_fit(X, y)

    def _wrap_backprop(self):
        """Record each batch's data loss: sklearn's _backprop returns its penalized loss, whose
        penalty we recompute from the weights it used (the optimizer steps after it returns).
        If a future sklearn renames _backprop, train_loss falls back to loss_ less the
        penalty at the end of the epoch."""
        model = self.model
        orig = getattr(type(model), "_backprop", None)
        self._batches = []
        if orig is None:
            self._wrapped = False
            return
        scale = 1.0 if self.workload.is_classification else 2.0   # sklearn's loss is mse/2
        batches = self._batches

        def _backprop(X, *args, **kwargs):
            sq = 0.0
            for W in model.coefs_:
                s = W.ravel()
                sq += float(np.dot(s, s))
            out = orig(model, X, *args, **kwargs)
            n = X.shape[0]
            batches.append(((out[0] - 0.5 * model.alpha * sq / n) * scale, n))
            return out

        model._backprop = _backprop
        self._wrapped = True

    def _penalty_now(self):
        return sum(float(np.dot(W.ravel(), W.ravel())) for W in self.model.coefs_)

    def run_epoch(self):
        perm = self._next_permutation()
        self._batches.clear()
        with self._limit():
            self._partial_fit(self._X[perm], self._y[perm])
        if self._wrapped and self._batches:
            self._train_loss = float(sum(l * n for l, n in self._batches)
                                     / sum(n for _, n in self._batches))
        else:
            scale = 1.0 if self.workload.is_classification else 2.0
            pen = 0.5 * self.alpha * self._penalty_now() / self.workload.batch_size
            self._train_loss = float((self.model.loss_ - pen) * scale)
        self._epochs += 1

    def _val_out(self):
        with self._limit():
            if self.workload.is_classification:
                return self.model.predict_proba(self.workload.X_val)
            return self.model.predict(self.workload.X_val).reshape(-1, 1)

    def val_loss(self):
        out = np.asarray(self._val_out(), dtype=np.float64)
        if self.workload.is_classification:
            p = out[np.arange(len(self.workload.y_val)), self.workload.y_val]
            return float(-np.log(np.clip(p, 1e-300, None)).mean())
        return float(((out - self.workload.y_val) ** 2).mean())

    def val_accuracy(self):
        if not self.workload.is_classification:
            return None
        out = self._val_out()
        return float((out.argmax(axis=1) == self.workload.y_val).mean())

    def get_weights(self):
        out = []
        for W, b in zip(self.model.coefs_, self.model.intercepts_):
            out += [np.asarray(W, np.float32).copy(), np.asarray(b, np.float32).copy()]
        return out


PEERS = {"torch": TorchEngine, "torch-cuda": TorchCudaEngine, "jax": JaxEngine,
         "sklearn": SklearnEngine}


def get_engine(name):
    """The engine class for a peer name ("torch", "torch-cuda", "jax", "sklearn")."""
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}") from None
