"""What a backend is: the operations it must implement and the hooks it may.

A backend is a package of fastreg.kernels (reference, numba, cython, cuda) whose __init__
exposes the operations below with the reference's signatures (kernels/reference/__init__.py
documents each). fastreg.backend resolves a name to a module and wraps it in `Backend`,
which checks the operations once and gives every optional hook a default, so the API never
probes a module with getattr or switches on a backend's name.
"""
from contextlib import nullcontext

# Shape legend: B batch rows, I fan_in, O fan_out, K outputs.
REQUIRED_OPERATIONS = (
    "dense_forward",           # out = dropout(noise(f(x @ W + b)))
    "dense_backward",          # dz, dW, db, dx from dL/d(out)
    "bn_dense_forward",        # the same with BatchNorm on the pre-activation
    "bn_dense_backward",
    "input_dropout",           # a part's input transform: dropout(noise(x))
    "weight_noise",            # a step's perturbed kernel W + sigma * n (weight noise)
    "loss_forward_backward",   # mean batch loss and its gradient from logits
    "loss_value",
    "output_transform",        # what predict returns from logits
    "penalized_update",        # the fused penalized optimizer step of one tensor
    "penalty_value",
    "train_epoch",             # a whole epoch (or a chunk of whole batches) of a Plan
    "forward_inference",       # logits of an inference Plan
)

OPTIONAL_HOOKS = (
    "available",       # () -> (ok, reason): can it run here (hardware, build)?
    "epoch_context",   # (plan) -> context manager around train_epoch calls (thread pools)
    "sync_to_host",    # (plan) -> None: device state back into the plan's host buffers
    "invalidate",      # (plan) -> None: forget device copies (host buffers changed)
    "philox_words",    # (n, seed, step, layer, stream) -> uint32 words, for tests and tools
)


class IncompleteBackend(ImportError):
    """A backend module that lacks a required operation (a broken or stale build)."""


class Backend:
    """A backend module with its optional hooks filled in."""

    def __init__(self, module):
        missing = [op for op in REQUIRED_OPERATIONS if not callable(getattr(module, op, None))]
        if missing:
            raise IncompleteBackend(f"backend {getattr(module, 'NAME', module.__name__)!r} "
                                    f"lacks {', '.join(missing)}")
        self.module = module
        self.name = module.NAME

    def __getattr__(self, name):
        # the operations are the module's, looked up at call time (a test may patch one)
        if name in REQUIRED_OPERATIONS:
            return getattr(self.module, name)
        raise AttributeError(name)

    def available(self):
        hook = getattr(self.module, "available", None)
        return hook() if hook is not None else (True, "")

    def epoch_context(self, plan):
        hook = getattr(self.module, "epoch_context", None)
        return hook(plan) if hook is not None else nullcontext()

    def sync_to_host(self, plan):
        hook = getattr(self.module, "sync_to_host", None)
        if hook is not None:
            hook(plan)

    def invalidate(self, plan):
        hook = getattr(self.module, "invalidate", None)
        if hook is not None:
            hook(plan)

    def philox_words(self, n, seed, step, layer, stream):
        hook = getattr(self.module, "philox_words", None)
        if hook is None:
            from .philox import philox_words
            return philox_words(n, seed, step, layer, stream)
        return hook(n, seed, step, layer, stream)

    def __repr__(self):
        return f"<fastreg backend {self.name!r}>"
