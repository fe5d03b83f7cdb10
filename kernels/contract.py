"""The kernel contract: the codes and array layouts that every backend shares.

Shape legend used across kernels/: B batch rows, I fan_in, O fan_out, K outputs, L dense layers.

Every backend module (reference, cpu, cython, cuda) provides the same functions:
    dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=0, noise_std=0, pre=None)
    dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=0, noise_std=0, pre=None)
    input_dropout(x, out, threshold, scale, seed, step, layer, noise=0, noise_std=0)
    loss_forward_backward(logits, y, grad, loss, n_total) -> summed loss of the batch
    loss_value(logits, y, loss) -> summed loss
    penalized_update(w, g, m, v, hp, opt, t) -> penalty of w before the step
    penalty_value(w, hp) -> penalty of w
    bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=0, noise_std=0, pre=None)
    bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer, noise=0,
                      noise_std=0, pre=None)
and the fused epoch / inference drivers built from them (see kernels/driver.py).

BatchNorm (training only; inference folds it into W, b): a dense layer with LI_BN = 1
normalizes its pre-activation z = x @ W + b over the batch rows, then gamma * zhat + beta,
activation, noise (dense_forward's: same stream, element order and pre), dropout. gb (2, O)
holds gamma (row BN_GAMMA) and beta (row BN_BETA), a parameter tensor updated by
penalized_update like a bias (never penalized); stats (2, O) the running mean and (biased)
variance; save (BN_SAVE_ROWS, O) float64 the batch statistics the forward leaves for the
backward; xhat (B, O) the normalized pre-activation.
"""

# Activations
ACT_LINEAR = 0
ACT_RELU = 1
ACT_LEAKY_RELU = 2
ACT_TANH = 3
ACT_SIGMOID = 4
ACTIVATIONS = {None: ACT_LINEAR, "linear": ACT_LINEAR, "relu": ACT_RELU,
               "leaky_relu": ACT_LEAKY_RELU, "tanh": ACT_TANH, "sigmoid": ACT_SIGMOID}

# Losses (from logits for the two cross-entropies)
LOSS_MSE = 0
LOSS_BCE = 1
LOSS_SCE = 2
LOSSES = {"mse": LOSS_MSE, "binary_crossentropy": LOSS_BCE,
          "sparse_categorical_crossentropy": LOSS_SCE}

# Targets y of LOSS_SCE: (B, 1) integer labels stored as floats, or (B, SCE_MIXED_WIDTH) mixed
# targets (Mixup): label a, label b, weight lam, whose loss is lam * CE(a) + (1 - lam) * CE(b)
# (in float64: lam * (lse - z_a) + (1 - lam) * (lse - z_b)) and gradient
# (softmax - lam * e_a - (1 - lam) * e_b) / B (in the dtype: p, minus lam at a, then minus
# 1 - lam at b). The width of y tells the two apart; one column is the plain loss.
SCE_LABEL = 0
SCE_LABEL_B = 1
SCE_LAM = 2
SCE_MIXED_WIDTH = 3

# Optimizers
OPT_SGD = 0
OPT_ADAM = 1
OPT_ADAMW = 2

# Layout of the per-tensor hyperparameter vector `hp` (dtype = the parameter's dtype).
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

# Layout of the per-layer integer and float configuration rows of a plan.
LI_ACT = 0          # activation code
LI_DROP_THR = 1     # output-dropout threshold (0: no dropout)
LI_HAS_BIAS = 2
LI_IN_DROP_THR = 3  # input-dropout threshold (standalone Dropout before this layer)
LI_BN = 4           # 1: BatchNorm on this layer's pre-activation (training plans only)
LI_NOISE = 5        # NOISE_* code of the noise on this layer's output (before its dropout)
LI_IN_NOISE = 6     # NOISE_* code of the noise on this layer's input (row 0: the inputs)
LI_SIZE = 7
LF_SLOPE = 0        # leaky_relu negative slope
LF_DROP_SCALE = 1   # 1 / keep_prob of the output dropout
LF_IN_DROP_SCALE = 2
LF_BN_EPS = 3       # BatchNorm epsilon (added to the batch variance)
LF_BN_MOMENTUM = 4  # BatchNorm running-statistics momentum (Keras convention)
LF_NOISE_STD = 5    # std of the output noise n: NOISE_ADD adds std*n, NOISE_MUL scales by 1+std*n
LF_IN_NOISE_STD = 6
LF_SIZE = 7

# Noise layers (fastreg.GaussianNoise / GaussianDropout), fused into a dense layer's forward
# epilogue: out = dropout(noise(f(x @ W + b))), n a standard normal from Philox (philox.py:
# stream STREAM_NOISE, Box-Muller). Training only. With a nonlinear activation, backward
# keeps the pre-noise activation f(z) (driver.Net.pres) besides the output; the noise itself
# is regenerated in backward (GaussianDropout's gradient needs it), never stored.
NOISE_NONE = 0
NOISE_ADD = 1       # a + std * n            GaussianNoise(stddev): std = stddev
NOISE_MUL = 2       # a * (1 + std * n)      GaussianDropout(rate): std = sqrt(rate / (1 - rate))

# BatchNorm layouts: rows of gb / stats (2, O), and of save (BN_SAVE_ROWS, O) float64.
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
