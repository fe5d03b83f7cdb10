"""Layers: constructors store and validate arguments; the model turns them into kernel plans.

Numbers may be Python or NumPy scalars (np.float32(0.1) is 0.1 here); the checks that depend
on the model's dtype (a BatchNorm eps that rounds to 0 in float32) run when the layer joins a
model (fastreg.network.check_in_model_dtype).
"""
import math

from .kernels import contract
from . import regularizers
from .validation import check_real, check_width

# Keras 3's names and formulas (fastreg.network.init_kernel); drawn from the model's seed
INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal",
                "orthogonal", "zeros", "ones")
BIAS_INITIALIZERS = ("zeros", "ones")


def check_rate(name, rate):
    return check_real(name, rate, 0.0, 1.0, max_open=True)


class Layer:
    def get_config(self):
        raise NotImplementedError


# The last Dense of a categorical model may say "softmax": the loss already takes its logits
# and predict returns the softmax probabilities, so the kernels see a linear layer there
# (network.check_loss_and_last_layer keeps it to that place).
SOFTMAX = "softmax"
ACTIVATION_NAMES = sorted(k for k in contract.ACTIVATIONS if k) + [SOFTMAX]


class Dense(Layer):
    """y = dropout(f(x @ W + b)), W of shape (fan_in, units).

    activation (Keras' names): None/"linear", "relu", "leaky_relu" (negative_slope, 0.01 by
    default, as in PyTorch), "tanh", "sigmoid", "gelu" (the exact erf form), "gelu_tanh" (its
    tanh approximation), "elu" (alpha, 1.0 by default), "selu", "silu" (alias "swish"),
    "softplus", "mish", "hard_sigmoid" (relu6(x + 3) / 6), and "softmax" on the last Dense of
    a categorical cross-entropy model only (the loss's logits path). dropout: drop
    probability of this layer's outputs (inverted dropout: kept units are scaled by
    1/(1 - rate)); off at inference. regularizer: a penalty or constraint (or a list of them)
    on W. bias_regularizer: the same for b (biases are never penalized unless asked for
    here). constraint: e.g. MaxNorm(3), the same as passing it in regularizer.
    kernel_initializer: one of INITIALIZERS (Keras' formulas; orthogonal with gain 1);
    bias_initializer: "zeros" or "ones". weight_noise: sigma >= 0 of the noise on the kernel
    (Graves 2011): each training step's forward and backward use W + sigma * n (n ~ N(0, 1)
    from Philox, a new draw per step and layer), the update acts on the clean W; off at
    inference and ignored by export. The same as regularizer=WeightNoise(sigma)
    (fastreg.WeightNoise); 0 (the default) is off.

    Keras' spellings are accepted: kernel_regularizer= (regularizer), kernel_constraint=
    (constraint), and input_shape=(n,) / input_dim=n on the first layer of a Sequential (the
    model's input width).

    activity_regularizer: L1(l), L2(l) or ElasticNet(l1, l2) (or a list of them) on the
    layer's OUTPUTS a = f(x @ W + b) (after a BatchNorm folded into it and the activation,
    before its noise and dropout: in Keras those are layers after the Dense), Keras'
    formula: each training step adds (l1 * sum |a| + l2 * sum a^2) / B over its B rows
    (L2 without the 1/2 of a kernel's L2; sample weights do not weigh it). Its gradient
    (l1 * sign(a) + 2 * l2 * a) / B is added to dL/da in the fused backward epilogue. Sparse
    representations (L1 drives outputs to exactly 0 under relu). Training only: reported in
    history["penalty"], not in "loss", predict or evaluate. Not on a "softmax" Dense.
    """

    def __init__(self, units, activation=None, dropout=0.0, regularizer=None, use_bias=True,
                 negative_slope=0.01, kernel_initializer="glorot_uniform",
                 bias_regularizer=None, constraint=None, alpha=1.0, bias_initializer="zeros",
                 kernel_regularizer=None, kernel_constraint=None, input_shape=None,
                 input_dim=None, weight_noise=0.0, activity_regularizer=None):
        regularizer = _alias("regularizer", regularizer, "kernel_regularizer",
                             kernel_regularizer)
        constraint = _alias("constraint", constraint, "kernel_constraint", kernel_constraint)
        self.input_shape = _input_shape(input_shape, input_dim)
        units = check_width("Dense units", units)
        if activation not in contract.ACTIVATIONS and activation != SOFTMAX:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{ACTIVATION_NAMES} or None")
        negative_slope = check_real("negative_slope", negative_slope, 0.0)
        alpha = check_real("elu's alpha", alpha, 0.0)
        if kernel_initializer not in INITIALIZERS:
            raise ValueError(f"unknown kernel_initializer {kernel_initializer!r}; choose one of "
                             f"{INITIALIZERS}")
        self.units = units
        self.activation = None if activation == "linear" else activation
        self.dropout = check_rate("dropout rate", dropout)
        regs = (regularizers.as_list(regularizer)
                + regularizers.as_list(constraint, "constraint"))
        self.weight_noise = _weight_noise(weight_noise, regs)
        # WeightNoise is a per-layer setting, not a penalty: kept as weight_noise only, so
        # Dense(weight_noise=s) and Dense(regularizer=WeightNoise(s)) are the same layer
        self.regularizer = [r for r in regs if not isinstance(r, regularizers.WeightNoise)]
        self.bias_regularizer = regularizers.as_list(bias_regularizer, "bias_regularizer")
        if any(isinstance(r, regularizers.WeightNoise) for r in self.bias_regularizer):
            raise ValueError("WeightNoise perturbs a kernel W; it does not apply to a bias "
                             "vector (pass it in regularizer= or as Dense(weight_noise=))")
        if any(r.maxnorm > 0 for r in self.bias_regularizer):
            raise ValueError("MaxNorm applies to a kernel's columns, not to a bias vector")
        if any(r.group > 0 for r in self.bias_regularizer):
            raise ValueError("GroupLasso groups a kernel's columns (units); it does not apply "
                             "to a bias vector")
        # validates a consistent combination now, not at fit time
        regularizers.combine(self.regularizer)
        regularizers.combine(self.bias_regularizer)
        if bias_initializer not in BIAS_INITIALIZERS:
            raise ValueError(f"unknown bias_initializer {bias_initializer!r}; choose one of "
                             f"{BIAS_INITIALIZERS}")
        self.use_bias = bool(use_bias)
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.activity_l1, self.activity_l2 = regularizers.activity_strengths(
            activity_regularizer)
        self.activity_regularizer = regularizers.as_list(activity_regularizer,
                                                         "activity_regularizer")
        if self.activation == SOFTMAX and self.activity_regularizer:
            raise ValueError("activity_regularizer on a softmax Dense: its kernels compute the "
                             "logits (the loss's softmax path), not the probabilities Keras "
                             "would penalize; put it on a hidden Dense")

    @property
    def activity(self):
        """(l1, l2) of its activity penalty (Keras' formula; (0, 0): none)."""
        return self.activity_l1, self.activity_l2

    @property
    def kernel_activation(self):
        """(contract activation code, its parameter) the kernels compute: "softmax" is the
        linear logits path; the parameter is elu's alpha or leaky_relu's negative slope."""
        if self.activation == SOFTMAX:
            return contract.ACT_LINEAR, 0.0
        return (contract.ACTIVATIONS[self.activation],
                self.alpha if self.activation == "elu" else self.negative_slope)

    def get_config(self):
        return {"class": "Dense", "units": self.units, "activation": self.activation,
                "dropout": self.dropout, "use_bias": self.use_bias,
                "negative_slope": self.negative_slope, "alpha": self.alpha,
                "kernel_initializer": self.kernel_initializer,
                "regularizer": [r.get_config() for r in self.regularizer],
                "bias_regularizer": [r.get_config() for r in self.bias_regularizer],
                # only when not the default: files stay as round 1 wrote them
                **({"bias_initializer": self.bias_initializer}
                   if self.bias_initializer != "zeros" else {}),
                **({"weight_noise": self.weight_noise} if self.weight_noise else {}),
                **({"activity_regularizer": [r.get_config()
                                             for r in self.activity_regularizer]}
                   if self.activity_regularizer else {})}

    def __repr__(self):
        noise = f", weight_noise={self.weight_noise:g}" if self.weight_noise else ""
        activity = (f", activity_regularizer={self.activity_regularizer}"
                    if self.activity_regularizer else "")
        return (f"Dense({self.units}, activation={self.activation!r}, dropout={self.dropout}, "
                f"regularizer={self.regularizer or None}{noise}{activity})")


def _weight_noise(value, regs):
    """Dense's weight_noise sigma: the argument and any WeightNoise in its regularizer list
    (they must agree where both say a sigma > 0)."""
    sigma = check_real("Dense weight_noise", value, 0.0)
    given = {r.sigma for r in regs if isinstance(r, regularizers.WeightNoise)}
    if sigma:
        given.add(sigma)
    given.discard(0.0)
    if len(given) > 1:
        raise ValueError(f"Dense: weight noise given twice with different sigmas "
                         f"{sorted(given)} (weight_noise= and WeightNoise in regularizer=): "
                         f"give one")
    return given.pop() if given else 0.0


def _alias(name, value, keras_name, keras_value):
    """fastreg's argument or its Keras spelling; not both."""
    if keras_value is None:
        return value
    if value is not None:
        raise ValueError(f"pass {name}= or {keras_name}= (its Keras spelling), not both")
    return keras_value


def _input_shape(input_shape, input_dim):
    """The input width a first layer declares (Keras' input_shape=(n,) or input_dim=n), or
    None."""
    if input_shape is not None:
        if input_dim is not None:
            raise ValueError("pass input_shape=(n,) or input_dim=n, not both")
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__") \
                or len(input_shape) != 1:
            raise ValueError(f"input_shape must be (n_features,): a Dense takes rows of "
                             f"features, got {input_shape!r}")
        input_dim = input_shape[0]
    return None if input_dim is None else check_width("input_dim", input_dim)


class Dropout(Layer):
    """Standalone dropout, e.g. on the inputs. After a Dense it is fused into that Dense's
    output dropout (two successive dropouts keep a unit with probability (1-p1)(1-p2))."""

    def __init__(self, rate):
        self.rate = check_rate("Dropout rate", rate)

    def get_config(self):
        return {"class": "Dropout", "rate": self.rate}

    def __repr__(self):
        return f"Dropout({self.rate})"


class BatchNorm(Layer):
    """Batch normalization (Ioffe & Szegedy, 2015) of the Dense layer right before it.

    Placement: the paper's. It normalizes that Dense's pre-activation z = x @ W + b, then
    gamma * zhat + beta, then the Dense's activation, then its dropout, all fused into the
    Dense's kernels: Dense(64, "relu"), BatchNorm() computes relu(BN(x @ W + b)). (A Keras
    BatchNormalization after an activated Dense normalizes the activation instead.) A
    GaussianNoise / GaussianDropout after the BatchNorm acts on that activation, before the
    dropout, as after a plain Dense.
    Training: mean and biased variance over the batch rows (accumulated in float64); the
    running statistics follow Keras: running = momentum * running + (1 - momentum) * batch,
    the variance the biased one (Keras 3). Inference (predict, evaluate, MC dropout) uses
    the running statistics. gamma (init 1) and beta (init 0) are trained by the model's
    optimizer and never penalized or decayed. The Dense's bias is kept (Keras' weight layout)
    but it is redundant: its gradient is exactly 0 (the batch mean absorbs it).
    """

    def __init__(self, momentum=0.99, eps=1e-3):
        # running = momentum * running + (1 - momentum) * batch
        self.momentum = check_real("BatchNorm momentum", momentum, 0.0, 1.0, min_open=True,
                                   max_open=True)
        self.eps = check_real("BatchNorm eps", eps, 0.0, min_open=True)

    def get_config(self):
        return {"class": "BatchNorm", "momentum": self.momentum, "eps": self.eps}

    def __repr__(self):
        return f"BatchNorm(momentum={self.momentum}, eps={self.eps})"


class GaussianNoise(Layer):
    """Additive Gaussian noise, training only: a + stddev * n, n ~ N(0, 1) per element.

    Before the first Dense it perturbs the inputs; after a Dense it perturbs that Dense's
    output, fused into its forward pass. Order in a dense block (Keras' list order):
    activation, then the noise, then the dropout: Dense(64, "relu"), GaussianNoise(0.1),
    Dropout(0.2) trains on dropout(relu(x @ W + b) + 0.1 * n). A Dense's own dropout= is
    applied last too; a standalone Dropout placed BEFORE a GaussianNoise on the same output is
    refused (it cannot be fused in that order). After a Dense with BatchNorm (Dense, BatchNorm,
    GaussianNoise) it perturbs the normalized activation f(BN(x @ W + b)); between a Dense and
    its BatchNorm it is refused. Off in predict and evaluate. The noise comes
    from Philox (stream STREAM_NOISE, Box-Muller), reproducible by the model's seed.
    """

    def __init__(self, stddev):
        self.stddev = check_real("GaussianNoise stddev", stddev, 0.0)

    def get_config(self):
        return {"class": "GaussianNoise", "stddev": self.stddev}

    def __repr__(self):
        return f"GaussianNoise({self.stddev})"


class GaussianDropout(Layer):
    """Multiplicative Gaussian noise, training only: a * e, e ~ N(1, rate / (1 - rate)) per
    element (Srivastava et al., 2014; Keras' GaussianDropout). Same placement rules as
    GaussianNoise (inputs before the first Dense, else the preceding Dense's output, after its
    activation and before its dropout; being multiplicative it commutes with dropout). Off in
    predict and evaluate."""

    def __init__(self, rate):
        self.rate = check_rate("GaussianDropout rate", rate)

    @property
    def stddev(self):
        """The std of the multiplier e: sqrt(rate / (1 - rate))."""
        return math.sqrt(self.rate / (1.0 - self.rate))

    def get_config(self):
        return {"class": "GaussianDropout", "rate": self.rate}

    def __repr__(self):
        return f"GaussianDropout({self.rate})"


class AlphaDropout(Layer):
    """Dropout for self-normalizing (selu) networks (Klambauer et al. 2017; Keras'
    AlphaDropout), training only: a unit is dropped with probability `rate` (the mask of a
    Dropout(rate) at the same place: same Philox stream, same bits), dropped units are set to
    alpha' = -selu_lambda * selu_alpha, then a * x + b with
    a = ((1 - rate) * (1 + rate * alpha'^2)) ** -0.5 and b = -a * alpha' * rate, which keeps
    zero mean and unit variance. Placement: on the inputs (before the first Dense) or on a
    Dense's output (after its activation and BatchNorm), like GaussianNoise; it is that
    output's only dropout and noise (no Dropout, Dense(dropout=...) or Gaussian noise there
    too). Off in predict and evaluate; MC dropout (predict(mc_samples=...)) samples it as
    it samples Dropout."""

    def __init__(self, rate):
        self.rate = check_rate("AlphaDropout rate", rate)

    @property
    def scale(self):
        """a = ((1 - rate) * (1 + rate * alpha'^2)) ** -0.5, in float64."""
        return ((1.0 - self.rate) * (1.0 + self.rate * contract.ALPHA_DROPPED ** 2)) ** -0.5

    @property
    def shift(self):
        """b = -a * alpha' * rate, in float64."""
        return -self.scale * contract.ALPHA_DROPPED * self.rate

    def get_config(self):
        return {"class": "AlphaDropout", "rate": self.rate}

    def __repr__(self):
        return f"AlphaDropout({self.rate})"


class ActivityRegularization(Layer):
    """Keras' ActivityRegularization(l1=0.0, l2=0.0): no weights, it penalizes its input,
    here the output a of the Dense before it, with Keras' formula (l1 * sum |a| + l2 *
    sum a^2) / B per training step of B rows. fastreg folds it onto that Dense (the same as
    Dense(activity_regularizer=ElasticNet(l1, l2)); both given: the strengths add).

    Placement: right after a Dense, or after its BatchNorm (then it penalizes f(BN(x @ W +
    b)), the Dense's output in fastreg's BatchNorm placement), before any Dropout or noise
    layer on that output; a Dense's own dropout= comes after it (fastreg applies a Dense's
    dropout last). Anywhere else it would penalize values the fused kernels do not compute
    (the inputs, a dropped or noisy output, a softmax's probabilities): ValueError naming
    the placement. Training only (history["penalty"]); predict and evaluate ignore it.
    """

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = check_real("ActivityRegularization l1", l1, 0.0, error=TypeError)
        self.l2 = check_real("ActivityRegularization l2", l2, 0.0, error=TypeError)

    @property
    def activity(self):
        return self.l1, self.l2

    def get_config(self):
        return {"class": "ActivityRegularization", "l1": self.l1, "l2": self.l2}

    def __repr__(self):
        return f"ActivityRegularization(l1={self.l1:g}, l2={self.l2:g})"


# The layers that take a dense output's (or the inputs') noise slot (contract NOISE_*).
NOISE_LAYERS = (GaussianNoise, GaussianDropout, AlphaDropout)


def noise_code(layer):
    """(contract NOISE_* code, its parameter) of a noise layer or None: the std of
    GaussianNoise / GaussianDropout, AlphaDropout's shift b; (NOISE_NONE, 0) when it is a
    no-op (stddev 0, rate 0)."""
    if isinstance(layer, AlphaDropout):
        return (contract.NOISE_ALPHA, layer.shift) if layer.rate else (contract.NOISE_NONE, 0.0)
    if layer is None or layer.stddev == 0:
        return contract.NOISE_NONE, 0.0
    return ((contract.NOISE_ADD if isinstance(layer, GaussianNoise) else contract.NOISE_MUL),
            layer.stddev)


def from_config(cfg):
    cfg = dict(cfg)
    kind = cfg.pop("class", None)
    if kind == "Dense":
        cfg["regularizer"] = [regularizers.from_config(r) for r in cfg.get("regularizer", [])]
        cfg["bias_regularizer"] = [regularizers.from_config(r)
                                   for r in cfg.get("bias_regularizer", [])]
        if "activity_regularizer" in cfg:
            cfg["activity_regularizer"] = [regularizers.from_config(r)
                                           for r in cfg["activity_regularizer"]] or None
        return Dense(**cfg)
    if kind == "Dropout":
        return Dropout(**cfg)
    if kind == "GaussianNoise":
        return GaussianNoise(**cfg)
    if kind == "GaussianDropout":
        return GaussianDropout(**cfg)
    if kind == "AlphaDropout":
        return AlphaDropout(**cfg)
    if kind == "BatchNorm":
        return BatchNorm(**cfg)
    if kind == "ActivityRegularization":
        return ActivityRegularization(**cfg)
    raise ValueError(f"unknown layer in config: {kind!r}")
