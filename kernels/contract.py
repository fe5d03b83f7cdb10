"""The kernel contract, written once: the codes, tables and array layouts every backend shares.

Shape legend used across kernels/: B batch rows, I fan_in, O fan_out, K outputs, L dense
layers, P parts (chains) of a network.

Everything a backend needs to know about an activation, a loss, an optimizer, a noise kind,
a hyperparameter slot or a Philox stream is a row of a table below. The Cython build reads
this file (``pxi_source()`` writes its constants; setup.py runs it) and the tests are
parametrized over the tables, so a backend that forgets an entry fails a test. The
operations every backend implements, and the optional hooks, are listed in
kernels/protocol.py.

This module imports nothing from fastreg (setup.py loads it by path, before anything is
installed).
"""
from dataclasses import dataclass

# ---------------------------------------------------------------- activations
ACT_LINEAR = 0
ACT_RELU = 1
ACT_LEAKY_RELU = 2
ACT_TANH = 3
ACT_SIGMOID = 4


@dataclass(frozen=True)
class Activation:
    """One activation f. `grad_from`: what backward computes f' from: "output" (a = f(z),
    the layer's stored output: relu, tanh...) or "input" (z itself, which the layer then
    keeps in its pre buffer: GELU, SiLU...). `unscale`: with dropout, an "output" f' needs
    the kept unit's value a = out / scale back (tanh, sigmoid); False when f' only looks at
    the sign (relu, leaky_relu) or is constant (linear)."""
    name: str
    code: int
    grad_from: str = "output"
    unscale: bool = False
    aliases: tuple = ()


ACTIVATION_TABLE = (
    Activation("linear", ACT_LINEAR, aliases=(None,)),
    Activation("relu", ACT_RELU),
    Activation("leaky_relu", ACT_LEAKY_RELU),
    Activation("tanh", ACT_TANH, unscale=True),
    Activation("sigmoid", ACT_SIGMOID, unscale=True),
)
N_ACTIVATIONS = max(a.code for a in ACTIVATION_TABLE) + 1
ACTIVATIONS = {key: a.code for a in ACTIVATION_TABLE for key in (a.name,) + a.aliases}
ACTIVATION_BY_CODE = {a.code: a for a in ACTIVATION_TABLE}


def keeps_pre(act, noise):
    """Whether backward needs a dense layer's pre buffer (Plan.pres): z itself for an
    activation whose derivative needs its input, else f(z) before the noise when a noise
    layer follows (f' can no longer be read off the noisy output; a linear f needs none)."""
    if ACTIVATION_BY_CODE[int(act)].grad_from == "input":
        return True
    return int(noise) != NOISE_NONE and int(act) != ACT_LINEAR


def unscale_output(act):
    """Whether a dropout-scaled output must be divided by the scale before f' reads it."""
    return ACTIVATION_BY_CODE[int(act)].unscale


# ---------------------------------------------------------------- losses (from logits)
LOSS_MSE = 0
LOSS_BCE = 1
LOSS_SCE = 2


@dataclass(frozen=True)
class Loss:
    """One loss. `output`: what predict() returns from the last layer's values ("identity",
    "sigmoid" or "softmax": the cross-entropies take logits from a linear last layer).
    `targets`: "values" (one per output), "probabilities" (values in [0, 1]) or "labels"
    (one integer class per row)."""
    name: str
    code: int
    output: str
    targets: str


LOSS_TABLE = (
    Loss("mse", LOSS_MSE, "identity", "values"),
    Loss("binary_crossentropy", LOSS_BCE, "sigmoid", "probabilities"),
    Loss("sparse_categorical_crossentropy", LOSS_SCE, "softmax", "labels"),
)
LOSSES = {loss.name: loss.code for loss in LOSS_TABLE}
LOSS_BY_CODE = {loss.code: loss for loss in LOSS_TABLE}

# Targets y of LOSS_SCE: (B, 1) integer labels stored as floats, or (B, SCE_MIXED_WIDTH) mixed
# targets (Mixup): label a, label b, weight lam, whose loss is lam * CE(a) + (1 - lam) * CE(b)
# (in float64: lam * (lse - z_a) + (1 - lam) * (lse - z_b)) and gradient
# (softmax - lam * e_a - (1 - lam) * e_b) / B (in the dtype: p, minus lam at a, then minus
# 1 - lam at b). The width of y tells the two apart; one column is the plain loss.
SCE_LABEL = 0
SCE_LABEL_B = 1
SCE_LAM = 2
SCE_MIXED_WIDTH = 3

# ---------------------------------------------------------------- optimizers
OPT_SGD = 0
OPT_ADAM = 1
OPT_ADAMW = 2


@dataclass(frozen=True)
class Optimizer:
    """One optimizer's update rule (formulas: kernels/reference/update.py). `moments`: the
    state it keeps per parameter, "m" (first moment / momentum) and "v" (second moment);
    SGD keeps "m" only with momentum > 0."""
    name: str
    code: int
    moments: tuple


OPTIMIZER_TABLE = (
    Optimizer("SGD", OPT_SGD, ("m",)),
    Optimizer("Adam", OPT_ADAM, ("m", "v")),
    Optimizer("AdamW", OPT_ADAMW, ("m", "v")),
)
OPTIMIZER_BY_CODE = {o.code: o for o in OPTIMIZER_TABLE}

# ---------------------------------------------------------------- hyperparameter slots
# The per-tensor hyperparameter vector `hp` (float64, HP_SIZE values) the fused update reads.
HP_LR = 0
HP_BETA1 = 1        # Adam beta1, or SGD momentum
HP_BETA2 = 2
HP_EPS = 3
HP_NESTEROV = 4     # 1.0 for Nesterov momentum
HP_DECOUPLED = 5    # AdamW decoupled weight decay
HP_L1 = 6
HP_L2 = 7
HP_PROXIMAL = 8     # 1.0: L1 by soft-thresholding after the step; 0.0: subgradient
HP_MAXNORM = 9      # 0.0: no constraint; else each column of W projected to norm <= c
HP_GROUP = 10       # group lasso: penalty l * sum_j ||W[:, j]||_2, block soft-thresholding
HP_SIZE = 11


@dataclass(frozen=True)
class Slot:
    """One hyperparameter slot. `owner`: who fills it ("optimizer" or "regularizer").
    `combine`: how the values of several regularizers on one tensor merge ("sum": the
    penalties add; "min": the tightest constraint wins; "agree": they must be equal)."""
    name: str
    index: int
    owner: str
    combine: str = ""
    default: float = 0.0


SLOT_TABLE = (
    Slot("lr", HP_LR, "optimizer"),
    Slot("beta1", HP_BETA1, "optimizer"),
    Slot("beta2", HP_BETA2, "optimizer"),
    Slot("eps", HP_EPS, "optimizer"),
    Slot("nesterov", HP_NESTEROV, "optimizer"),
    Slot("decoupled", HP_DECOUPLED, "optimizer"),
    Slot("l1", HP_L1, "regularizer", "sum"),
    Slot("l2", HP_L2, "regularizer", "sum"),
    Slot("proximal", HP_PROXIMAL, "regularizer", "agree", 1.0),
    Slot("maxnorm", HP_MAXNORM, "regularizer", "min"),
    Slot("group", HP_GROUP, "regularizer", "sum"),
)
SLOTS = {s.name: s for s in SLOT_TABLE}

# ---------------------------------------------------------------- noise kinds
# Noise layers (fastreg.GaussianNoise / GaussianDropout), fused into a dense layer's forward
# epilogue: out = dropout(noise(f(x @ W + b))), n a standard normal from Philox (stream
# STREAM_NOISE, Box-Muller). Training only. With a nonlinear activation, backward keeps the
# pre-noise activation f(z) (keeps_pre) besides the output; the noise itself is regenerated
# in backward (GaussianDropout's gradient needs it), never stored.
NOISE_NONE = 0
NOISE_ADD = 1       # a + std * n            GaussianNoise(stddev): std = stddev
NOISE_MUL = 2       # a * (1 + std * n)      GaussianDropout(rate): std = sqrt(rate / (1 - rate))


@dataclass(frozen=True)
class Noise:
    """One noise kind. `regenerated_in_backward`: its gradient needs the draw again
    (GaussianDropout's factor; additive noise leaves no trace in the gradient)."""
    name: str
    code: int
    layer: str
    regenerated_in_backward: bool


NOISE_TABLE = (
    Noise("none", NOISE_NONE, "", False),
    Noise("add", NOISE_ADD, "GaussianNoise", False),
    Noise("mul", NOISE_MUL, "GaussianDropout", True),
)

# ---------------------------------------------------------------- Philox streams
# A draw is a pure function of (seed, step, layer word, stream, element): counter =
# (element // 4, step, layer word, stream) (kernels/philox.py). A distinct stream word per
# purpose, so no two purposes ever share bits.
STREAM_DROPOUT = 0        # dropout on a dense layer's output
STREAM_INPUT_DROPOUT = 1  # dropout on a part's input (a standalone Dropout before its Dense)
STREAM_NOISE = 2          # Gaussian noise / Gaussian dropout on a dense layer's output
STREAM_AUGMENT = 3        # data augmentation: GaussianJitter's noise (fastreg.augment)
STREAM_MC = 4             # MC-dropout samples at inference (the layer word's tag)
STREAM_AUGMENT_MIXUP = 5    # Mixup: the per-sample weight lambda ~ Beta(alpha, alpha)
STREAM_AUGMENT_PARTNER = 6  # Mixup: the partner permutation inside each batch
STREAM_AUGMENT_FLIP = 7     # RandomFlip: flip or not, per sample
STREAM_AUGMENT_SHIFT = 8    # RandomShift: (dy, dx) per sample
STREAM_INPUT_NOISE = 9      # noise on a part's input (GaussianNoise / GaussianDropout first)
STREAM_AUGMENT_JITTER = STREAM_AUGMENT


@dataclass(frozen=True)
class Stream:
    name: str
    word: int
    purpose: str


STREAM_TABLE = (
    Stream("dropout", STREAM_DROPOUT, "dropout on a dense layer's output"),
    Stream("input_dropout", STREAM_INPUT_DROPOUT, "dropout on a part's input"),
    Stream("noise", STREAM_NOISE, "Gaussian noise / dropout on a dense layer's output"),
    Stream("augment_jitter", STREAM_AUGMENT_JITTER, "GaussianJitter's noise"),
    Stream("mc", STREAM_MC, "the tag of MC-dropout layer words"),
    Stream("augment_mixup", STREAM_AUGMENT_MIXUP, "Mixup's lambda"),
    Stream("augment_partner", STREAM_AUGMENT_PARTNER, "Mixup's partner permutation"),
    Stream("augment_flip", STREAM_AUGMENT_FLIP, "RandomFlip's coin"),
    Stream("augment_shift", STREAM_AUGMENT_SHIFT, "RandomShift's offsets"),
    Stream("input_noise", STREAM_INPUT_NOISE, "noise on a part's input"),
)

# MC dropout runs the training forward kernels, whose stream word is fixed by the kind of
# dropout; its draws are told apart from training's by the layer word: dense layer l of an MC
# pass uses layer word MC_LAYER_TAG | l. Training's layer words are the layer indices
# l < MAX_LAYER_WORDS, so no MC counter ever equals a training counter.
MC_LAYER_TAG = STREAM_MC << 16
MAX_LAYER_WORDS = 1 << 16

# ---------------------------------------------------------------- per-layer configuration
# Layout of the per-layer integer and float configuration rows of a plan (kernels/plan.py).
# A layer's LI_IN_* / LF_IN_* fields describe its part's input transform and are read on
# the first layer of each part only.
LI_ACT = 0          # activation code
LI_DROP_THR = 1     # output-dropout threshold (0: no dropout)
LI_HAS_BIAS = 2
LI_IN_DROP_THR = 3  # input-dropout threshold (a standalone Dropout before the part's Dense)
LI_BN = 4           # 1: BatchNorm on this layer's pre-activation (training plans only)
LI_NOISE = 5        # NOISE_* code of the noise on this layer's output (before its dropout)
LI_IN_NOISE = 6     # NOISE_* code of the noise on the part's input
LI_SIZE = 7
LF_SLOPE = 0        # leaky_relu negative slope
LF_DROP_SCALE = 1   # 1 / keep_prob of the output dropout
LF_IN_DROP_SCALE = 2
LF_BN_EPS = 3       # BatchNorm epsilon (added to the batch variance)
LF_BN_MOMENTUM = 4  # BatchNorm running-statistics momentum (Keras convention)
LF_NOISE_STD = 5    # std of the output noise n: NOISE_ADD adds std*n, NOISE_MUL scales by 1+std*n
LF_IN_NOISE_STD = 6
LF_SIZE = 7

# ---------------------------------------------------------------- parts (a tree of chains)
# A network is a trunk and heads: parts, each a chain of consecutive dense layers. Part 0 is
# the trunk and reads the inputs; every other part (a head) reads the trunk's output. A part
# with a loss (PT_LOSS >= 0) ends in logits compared with columns [PT_Y0, PT_Y1) of the
# targets, its loss weighted by PF_WEIGHT. A Sequential is one part: trunk and head at once.
PT_FIRST = 0        # first dense layer of the part
PT_END = 1          # one past its last
PT_INPUT = 2        # -1: the inputs X; else the part whose output it reads (0, the trunk)
PT_LOSS = 3         # LOSS_* code, or -1 (a trunk under heads)
PT_Y0 = 4           # its target columns in Y
PT_Y1 = 5
PT_SIZE = 6
PF_WEIGHT = 0       # the loss weight
PF_SIZE = 1

# ---------------------------------------------------------------- BatchNorm layouts
# A dense layer with LI_BN = 1 normalizes its pre-activation z = x @ W + b over the batch
# rows, then gamma * zhat + beta, activation, noise, dropout. gb (2, O) holds gamma (row
# BN_GAMMA) and beta (row BN_BETA), a parameter tensor updated by penalized_update like a bias
# (never penalized); stats (2, O) the running mean and (biased) variance; save
# (BN_SAVE_ROWS, O) float64 the batch statistics the forward leaves for the backward; xhat
# (B, O) the normalized pre-activation.
BN_GAMMA = 0
BN_BETA = 1
BN_MEAN = 0         # stats row: running mean
BN_VAR = 1          # stats row: running variance
BN_SAVE_MEAN = 0    # batch mean (float64), for the running-mean update
BN_SAVE_VAR = 1     # biased batch variance (float64), for the running-variance update
BN_SAVE_INVSTD = 2  # 1 / sqrt(var + eps), rounded to the parameter dtype: backward needs it
BN_SAVE_C1 = 3      # backward scratch: sum dy, then the per-unit coefficients
BN_SAVE_C2 = 4
BN_SAVE_C3 = 5
BN_SAVE_ROWS = 6

# Below this many elements an elementwise pass runs on one thread: waking a pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 16


# ---------------------------------------------------------------- the Cython constants
def integer_constants():
    """{NAME: value} of every integer constant above: what the Cython kernels compile in."""
    return {name: value for name, value in globals().items()
            if name.isupper() and isinstance(value, int) and not isinstance(value, bool)}


def pxi_source():
    """kernels/cython/contract.pxi, generated at build time from this file: the integer
    constants as a C enum, and the activation flags as a lookup table."""
    lines = ["# Generated from kernels/contract.py by setup.py: do not edit.", "cdef enum:"]
    lines += [f"    {name} = {value}" for name, value in sorted(integer_constants().items())]
    unscale = ", ".join("1" if ACTIVATION_BY_CODE.get(c) and ACTIVATION_BY_CODE[c].unscale
                        else "0" for c in range(N_ACTIVATIONS))
    lines += ["", f"cdef int ACT_UNSCALE[{N_ACTIVATIONS}]", f"ACT_UNSCALE[:] = [{unscale}]",
              "", "CONTRACT = dict(" + ", ".join(
                  f"{name}={name}" for name in sorted(integer_constants())) + ")", ""]
    return "\n".join(lines)
