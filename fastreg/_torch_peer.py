"""PyTorch modules for fastreg.export.to_torch (imported only there: it imports torch).

GaussianNoise and GaussianDropout as Keras defines them (fastreg's layers), training only;
Exp (poisson's output transform: the rate from the log-rate); MultiHead: a shared trunk and
named heads whose forward returns {head: output}."""
import math

import torch
from torch import nn


class GaussianNoise(nn.Module):
    """x + stddev * n, n ~ N(0, 1) per element, in training mode only."""

    def __init__(self, stddev):
        super().__init__()
        self.stddev = float(stddev)

    def forward(self, x):
        if not self.training or self.stddev == 0:
            return x
        return x + self.stddev * torch.randn_like(x)

    def extra_repr(self):
        return f"stddev={self.stddev}"


class GaussianDropout(nn.Module):
    """x * (1 + s * n), s = sqrt(rate / (1 - rate)), n ~ N(0, 1), in training mode only."""

    def __init__(self, rate):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        return x * (1 + math.sqrt(self.rate / (1 - self.rate)) * torch.randn_like(x))

    def extra_repr(self):
        return f"rate={self.rate}"


class Exp(nn.Module):
    """exp(x): a poisson model's rate from its last layer's log-rate."""

    def forward(self, x):
        return torch.exp(x)


class MultiHead(nn.Module):
    """fastreg's MultiTask as a module: the trunk once, then every head on its output."""

    def __init__(self, trunk, heads):
        super().__init__()
        self.trunk = trunk
        self.head_names = list(heads)
        # ModuleDict keys cannot hold ".", which fastreg's head names may
        self.heads = nn.ModuleDict({_key(name): head for name, head in heads.items()})

    def forward(self, x):
        h = self.trunk(x)
        return {name: self.heads[_key(name)](h) for name in self.head_names}


def _key(name):
    return name.replace(".", "_dot_")
