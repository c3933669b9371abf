"""The grid network, its building blocks (Residual, Parallel) and its executors."""

from .network import Network
from .parallel import Parallel
from .residual import Residual
from .stepping import Stepper, StepState, train_while_running

__all__ = ["Network", "Parallel", "Residual", "StepState", "Stepper", "train_while_running"]
