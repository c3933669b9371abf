"""Gradient-descent training: losses, optimizers, schedules, clipping, ``fit`` and ``evaluate``.

::

    import loomx
    from loomx.train import load_digits

    x, y, x_test, y_test = load_digits()
    history = loomx.fit(net, x, y, epochs=10, validation_data=(x_test, y_test))
    result = loomx.evaluate(net, x_test, y_test)
"""

from .callbacks import Callback, LambdaCallback
from .clip import clip_grad_norm, clip_grad_value, global_grad_norm
from .data import load_digits
from .evaluate import Evaluation, evaluate
from .fit import FitState, fit
from .history import History
from .losses import LOSSES, Loss, get_loss
from .metrics import DeviationMetrics, SampleResult
from .optim import OPTIMIZERS, SGD, Adam, AdamW, Optimizer, RMSprop, get_optimizer
from .schedules import SCHEDULES, Schedule, get_schedule

__all__ = [
    "LOSSES", "OPTIMIZERS", "SCHEDULES", "SGD", "Adam", "AdamW", "Callback", "DeviationMetrics",
    "Evaluation", "FitState", "History", "LambdaCallback", "Loss", "Optimizer", "RMSprop",
    "SampleResult", "Schedule", "clip_grad_norm", "clip_grad_value", "evaluate", "fit",
    "get_loss", "get_optimizer", "get_schedule", "global_grad_norm", "load_digits",
]
