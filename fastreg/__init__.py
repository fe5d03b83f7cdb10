"""fastreg: fast, trustworthy training of regularized neural networks.

    import fastreg as fr
    model = fr.Sequential([fr.Dense(64, "relu", dropout=0.1, regularizer=fr.L2(1e-4)),
                           fr.Dense(1)], input_dim=8, seed=0)
    model.compile(loss="mse", optimizer=fr.Adam(learning_rate=1e-3))
    model.fit(X, y, epochs=50, batch_size=128, validation_data=(Xv, yv))
"""
from .augment import GaussianJitter, Mixup, RandomFlip, RandomShift
from .backend import BackendUnavailable
from .callbacks import (BackupAndRestore, Callback, CSVLogger, EarlyStopping, History,
                        LambdaCallback, LearningRateScheduler, ModelCheckpoint,
                        ReduceLROnPlateau, TerminateOnNaN)
from .diagnose import Diagnosis, diagnose
from .layers import (ActivityRegularization, AlphaDropout, BatchNorm, Dense, Dropout,
                     GaussianDropout, GaussianNoise)
from .model import Sequential
from .pruning import PruneReport
from .saving import load_model
from .multitask import MultiTask
from .optimizers import SGD, Adam, AdamW
from .regularizers import L1, L2, ElasticNet, GroupLasso, MaxNorm, WeightNoise
from .sweep import regularization_path, sweep
from . import losses, metrics, schedules  # noqa: E402  (fr.losses.Huber, fr.schedules...)
from . import integrations  # noqa: E402  (fr.integrations.OptunaPruningCallback; optuna lazy)

from ._version import __version__

__all__ = ["Sequential", "load_model", "PruneReport", "Dense", "Dropout", "BatchNorm",
           "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "losses",
           "L1", "L2", "ElasticNet", "MaxNorm", "GroupLasso", "WeightNoise",
           "SGD", "Adam", "AdamW", "EarlyStopping", "ModelCheckpoint", "BackupAndRestore",
           "Callback", "History", "BackendUnavailable", "ReduceLROnPlateau",
           "LearningRateScheduler", "CSVLogger", "TerminateOnNaN", "LambdaCallback",
           "metrics", "schedules",
           "GaussianJitter", "Mixup", "RandomFlip", "RandomShift",
           "sweep", "regularization_path", "diagnose", "Diagnosis", "MultiTask",
           "integrations", "__version__"]
