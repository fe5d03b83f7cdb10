"""The kernel contract: the codes and array layouts that every backend shares.

Shape legend used across kernels/: B batch rows, I fan_in, O fan_out, K outputs, L dense layers.

Every backend module (reference, cpu, cython, cuda) provides the same functions:
    dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer)
    dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer)
    input_dropout(x, out, threshold, scale, seed, step, layer)
    loss_forward_backward(logits, y, grad, loss, n_total) -> summed loss of the batch
    loss_value(logits, y, loss) -> summed loss
    penalized_update(w, g, m, v, hp, opt, t) -> penalty of w before the step
    penalty_value(w, hp) -> penalty of w
and the fused epoch / inference drivers built from them (see kernels/driver.py).
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
LI_SIZE = 4
LF_SLOPE = 0        # leaky_relu negative slope
LF_DROP_SCALE = 1   # 1 / keep_prob of the output dropout
LF_IN_DROP_SCALE = 2
LF_SIZE = 3
