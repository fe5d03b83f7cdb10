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
ACT_GELU = 5          # z * Phi(z), Phi the normal CDF (the exact erf form: Keras' "gelu")
ACT_GELU_TANH = 6     # the tanh approximation (Keras gelu(approximate=True), torch 'tanh')
ACT_ELU = 7           # z if z > 0 else alpha * expm1(z); alpha in the LF_SLOPE slot
ACT_SELU = 8          # SELU_LAMBDA * z if z > 0 else SELU_LAMBDA * SELU_ALPHA * expm1(z)
ACT_SILU = 9          # z * sigmoid(z), alias swish
ACT_SOFTPLUS = 10     # log(1 + exp(z)), as max(z, 0) + log1p(exp(-|z|))
ACT_MISH = 11         # z * tanh(softplus(z))
ACT_HARD_SIGMOID = 12  # relu6(z + 3) / 6 (Keras 3 and torch)

# SELU's constants (Klambauer et al. 2017; the digits Keras and torch use), and
# AlphaDropout's value of a dropped unit, -SELU_LAMBDA * SELU_ALPHA (NOISE_ALPHA below).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_NEG = SELU_LAMBDA * SELU_ALPHA
ALPHA_DROPPED = -SELU_NEG
# GELU: Phi(z) = 0.5 * erfc(-z * SQRT_HALF) (erfc: no cancellation for z << 0), its density
# INV_SQRT_2PI * exp(-z^2 / 2); the tanh form 0.5 z (1 + tanh(GELU_K (z + GELU_C z^3))).
SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
GELU_K = 0.7978845608028654
GELU_C = 0.044715


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
    Activation("gelu", ACT_GELU, grad_from="input"),
    Activation("gelu_tanh", ACT_GELU_TANH, grad_from="input"),
    # f' = f(z) + alpha (z <= 0): read off the output, as relu's sign is
    Activation("elu", ACT_ELU, unscale=True),
    Activation("selu", ACT_SELU, unscale=True),
    Activation("silu", ACT_SILU, grad_from="input", aliases=("swish",)),
    Activation("softplus", ACT_SOFTPLUS, grad_from="input"),
    Activation("mish", ACT_MISH, grad_from="input"),
    # f' = 1/6 where 0 < a < 1: the output tells it
    Activation("hard_sigmoid", ACT_HARD_SIGMOID, unscale=True),
)
N_ACTIVATIONS = max(a.code for a in ACTIVATION_TABLE) + 1
ACTIVATIONS = {key: a.code for a in ACTIVATION_TABLE for key in (a.name,) + a.aliases}
ACTIVATION_BY_CODE = {a.code: a for a in ACTIVATION_TABLE}


def keeps_pre(act, noise, dropout=False, activity=False):
    """Whether backward needs a dense layer's pre buffer (Plan.pres): z itself for an
    activation whose derivative needs its input, else f(z) before the noise when a noise
    layer follows (f' can no longer be read off the noisy output; a linear f needs none),
    or before the dropout when the layer has an activity penalty (`activity`: its gradient
    needs a = f(z) of every unit, also of the dropped ones, whose output holds 0)."""
    if ACTIVATION_BY_CODE[int(act)].grad_from == "input":
        return True
    if activity and (dropout or int(noise) != NOISE_NONE):
        return True
    return int(noise) != NOISE_NONE and int(act) != ACT_LINEAR


def unscale_output(act):
    """Whether a dropout-scaled output must be divided by the scale before f' reads it."""
    return ACTIVATION_BY_CODE[int(act)].unscale


# ---------------------------------------------------------------- losses (from logits)
LOSS_MSE = 0
LOSS_BCE = 1
LOSS_SCE = 2
LOSS_MAE = 3
LOSS_HUBER = 4
LOSS_LOG_COSH = 5
LOSS_CCE = 6
LOSS_POISSON = 7


@dataclass(frozen=True)
class Loss:
    """One loss. `output`: what predict() returns from the last layer's values ("identity";
    "sigmoid" or "softmax": the cross-entropies take logits from a linear last layer;
    "exp": poisson takes the log-rate and predicts the rate). `targets`: "values" (one per
    output), "probabilities" (values in [0, 1]), "distributions" (one row of K
    probabilities summing to 1 per sample: one-hot or soft), "labels" (one integer class
    per row) or "counts" (values >= 0). `param`: the name of its parameter, carried in the
    part's PF_LOSS_PARAM slot ("" for none), `default` its value when not given. `aliases`:
    the other names compile() accepts (Keras' long names)."""
    name: str
    code: int
    output: str
    targets: str
    param: str = ""
    default: float = 0.0
    aliases: tuple = ()


LOSS_TABLE = (
    Loss("mse", LOSS_MSE, "identity", "values", aliases=("mean_squared_error",)),
    Loss("binary_crossentropy", LOSS_BCE, "sigmoid", "probabilities"),
    Loss("sparse_categorical_crossentropy", LOSS_SCE, "softmax", "labels",
         "label_smoothing"),
    Loss("mae", LOSS_MAE, "identity", "values", aliases=("mean_absolute_error",)),
    Loss("huber", LOSS_HUBER, "identity", "values", "delta", 1.0),
    Loss("log_cosh", LOSS_LOG_COSH, "identity", "values", aliases=("logcosh",)),
    Loss("categorical_crossentropy", LOSS_CCE, "softmax", "distributions",
         "label_smoothing"),
    Loss("poisson", LOSS_POISSON, "exp", "counts"),
)
LOSSES = {key: loss.code for loss in LOSS_TABLE for key in (loss.name,) + loss.aliases}
LOSS_BY_CODE = {loss.code: loss for loss in LOSS_TABLE}

# The formulas (kernels/reference/loss.py is their spec). Elementwise losses are means over
# all B * K elements, d = logit - target: mae |d|; huber 0.5 d^2 where |d| <= delta, else
# delta * (|d| - 0.5 delta); log_cosh log(cosh(d)); poisson exp(z) - y * z from the
# log-rate z (torch's PoissonNLLLoss(log_input=True); Keras' poisson on the rate exp(z)).
# The categorical ones are means over the B rows of sum_k -t_k log softmax(z)_k, with the
# targets smoothed by label_smoothing ls when ls > 0: t = (1 - ls) * y + ls / K (y one-hot
# rows, or the label's one-hot row for the sparse one).

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
# Noise layers (fastreg.GaussianNoise / GaussianDropout / AlphaDropout), fused into a dense
# layer's forward epilogue: out = dropout(noise(f(x @ W + b))), n a standard normal from
# Philox (stream STREAM_NOISE, Box-Muller). Training only. With a nonlinear activation,
# backward keeps the pre-noise activation f(z) (keeps_pre) besides the output; the noise
# itself is regenerated in backward (GaussianDropout's gradient needs it), never stored.
NOISE_NONE = 0
NOISE_ADD = 1       # a + std * n            GaussianNoise(stddev): std = stddev
NOISE_MUL = 2       # a * (1 + std * n)      GaussianDropout(rate): std = sqrt(rate / (1 - rate))
# AlphaDropout(rate) (Klambauer et al. 2017, Keras' semantics): the layer's (or the part's
# input) dropout mask of `rate` (threshold LI_DROP_THR / LI_IN_DROP_THR, the dropout
# streams: the same masks as Dropout(rate)), dropped units set to ALPHA_DROPPED, then the
# affine map that keeps a selu net's mean and variance:
#     out = scale * (a if kept else ALPHA_DROPPED) + shift,
#     scale = ((1 - rate) * (1 + rate * ALPHA_DROPPED**2)) ** -0.5 (the dropout scale slot),
#     shift = -scale * ALPHA_DROPPED * rate (the noise std slot, see LF_ALPHA_SHIFT).
# Its gradient is the dropout's (scale where kept, else 0): nothing is regenerated but the
# mask, as for NOISE_ADD; f' reads the kept f(z) in pre (keeps_pre), as with any noise.
NOISE_ALPHA = 3


@dataclass(frozen=True)
class Noise:
    """One noise kind. `regenerated_in_backward`: its gradient needs the draw again
    (GaussianDropout's factor; additive noise leaves no trace in the gradient). `normals`:
    it draws standard normals (stream STREAM_NOISE / STREAM_INPUT_NOISE)."""
    name: str
    code: int
    layer: str
    regenerated_in_backward: bool
    normals: bool = True


NOISE_TABLE = (
    Noise("none", NOISE_NONE, "", False, False),
    Noise("add", NOISE_ADD, "GaussianNoise", False),
    Noise("mul", NOISE_MUL, "GaussianDropout", True),
    Noise("alpha", NOISE_ALPHA, "AlphaDropout", False, False),
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
STREAM_WEIGHT_NOISE = 10    # noise on a dense layer's kernel W (Dense(weight_noise=), WeightNoise)
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
    Stream("weight_noise", STREAM_WEIGHT_NOISE, "noise on a dense layer's kernel W"),
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
LF_SLOPE = 0        # the activation's parameter: leaky_relu's negative slope, elu's alpha
LF_DROP_SCALE = 1   # 1 / keep_prob of the output dropout (AlphaDropout: its scale)
LF_IN_DROP_SCALE = 2
LF_BN_EPS = 3       # BatchNorm epsilon (added to the batch variance)
LF_BN_MOMENTUM = 4  # BatchNorm running-statistics momentum (Keras convention)
LF_NOISE_STD = 5    # std of the output noise n: NOISE_ADD adds std*n, NOISE_MUL scales by 1+std*n
LF_IN_NOISE_STD = 6
LF_WEIGHT_NOISE_STD = 7   # sigma of the noise on W (Graves 2011); 0: off (training plans only)
# Activity regularization (Keras' activity_regularizer, fastreg.ActivityRegularization): a
# penalty on the layer's output a = f(z) (after BatchNorm and the activation, before its
# noise and dropout), divided by the step's batch rows B:
#     (l1 * sum |a| + l2 * sum a^2) / B,   dL/da += (l1 * sign(a) + 2 * l2 * a) / B,
# added to the data gradient dL/da (mask, scale and noise factor undone) before f'. 0: off.
LF_ACTIVITY_L1 = 8
LF_ACTIVITY_L2 = 9
LF_SIZE = 10
# NOISE_ALPHA's shift lives in its noise slot (the parameter of the layer's noise kind)
LF_ALPHA_SHIFT = LF_NOISE_STD
LF_IN_ALPHA_SHIFT = LF_IN_NOISE_STD


# Weight noise (Graves 2011; fastreg.WeightNoise / Dense(weight_noise=sigma)): with
# LF_WEIGHT_NOISE_STD = sigma > 0, each training step of layer l uses the perturbed kernel
#     Wn = W + sigma * n,   n the standard normals of (seed, step, layer word l,
#                           STREAM_WEIGHT_NOISE), element e the row-major index of W,
# by kernels/philox.py's Box-Muller pairing, n rounded once to the dtype, then sigma * n and
# the sum in the dtype (NOISE_ADD's roundings). Wn replaces W in the forward GEMM
# (z = x @ Wn + b) and in the backward data-gradient GEMM (dx = dz @ Wn^T); dW = x^T dz is
# unchanged, so the gradient is the loss's at the perturbed weights; the penalties, prox,
# max-norm and the optimizer update act on the clean W (the stored parameters never hold
# noise). The bias is never perturbed. Inference plans carry 0 (predict, evaluate, MC
# dropout use the clean W). Wn lives in a per-layer scratch of W's shape (Plan.wnoises),
# drawn once per step before the forward and read again by the backward.


def weight_noise_on(lf, l):
    """Whether dense layer l of a plan with float rows lf trains on a perturbed kernel."""
    return float(lf[l, LF_WEIGHT_NOISE_STD]) > 0.0


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
PT_W = 6            # the column of Y holding its rows' sample weights, or -1 (all 1): the
#                     batch loss is then sum_r w_r l_r / B (Keras), each row's gradient * w_r
PT_Z0 = 7           # the first column of train_epoch's zout receiving its logits of every
#                     trained row (in perm's order: the running metrics), or -1: not kept
PT_SIZE = 8
PF_WEIGHT = 0       # the loss weight
PF_LOSS_PARAM = 1   # the loss's parameter (Loss.param: huber's delta, label smoothing)
PF_SIZE = 2

# ---------------------------------------------------------------- gradient clipping
# One of Keras' optimizer options, applied to the data gradient of every tensor after the
# backward and before the fused penalized update (as PyTorch clips .grad before step()):
# CLIP_VALUE clamps each element to [-c, c]; CLIP_NORM scales each tensor whose L2 norm
# exceeds c, CLIP_GLOBAL_NORM every tensor when their joint norm does, by
# c / (norm + CLIP_EPS) (torch.nn.utils.clip_grad_norm_'s coefficient; norms in float64).
CLIP_NONE = 0
CLIP_VALUE = 1
CLIP_NORM = 2
CLIP_GLOBAL_NORM = 3
CLIP_EPS = 1e-6

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


def float_constants():
    """{NAME: value} of every float constant above (SELU's, GELU's): compiled in as doubles."""
    return {name: value for name, value in globals().items()
            if name.isupper() and isinstance(value, float)}


def pxi_source():
    """kernels/cython/contract.pxi, generated at build time from this file: the integer
    constants as a C enum, the float ones as doubles, and the activation flags as a lookup
    table."""
    lines = ["# Generated from kernels/contract.py by setup.py: do not edit.", "cdef enum:"]
    lines += [f"    {name} = {value}" for name, value in sorted(integer_constants().items())]
    lines += [""] + [f"cdef double {name} = {value!r}"
                     for name, value in sorted(float_constants().items())]
    unscale = ", ".join("1" if ACTIVATION_BY_CODE.get(c) and ACTIVATION_BY_CODE[c].unscale
                        else "0" for c in range(N_ACTIVATIONS))
    lines += ["", f"cdef int ACT_UNSCALE[{N_ACTIVATIONS}]", f"ACT_UNSCALE[:] = [{unscale}]",
              "", "CONTRACT = dict(" + ", ".join(
                  f"{name}={name}" for name in sorted(integer_constants())) + ")",
              "CONTRACT_FLOATS = dict(" + ", ".join(
                  f"{name}={name}" for name in sorted(float_constants())) + ")", ""]
    return "\n".join(lines)
