"""Workloads a–d written directly in numpy: the yardstick of the backend's overhead.

One module per workload (:mod:`.mlp`, :mod:`.cnn`, :mod:`.lstm`, :mod:`.block`), each with its
parameter shapes, ``*_loss_and_grads`` (forward and backward by hand) and ``*_step_op`` (one
SGD training step to time); :mod:`.common` has what they share and :mod:`.peak` the measured
matrix-product peak. Their gradients are checked against PyTorch autograd in the tests.
"""

from .block import block_step_op
from .cnn import cnn_step_op
from .lstm import lstm_step_op
from .mlp import mlp_step_op
from .peak import cuda_sgemm_gflops, sgemm_gflops

__all__ = ["block_step_op", "cnn_step_op", "cuda_sgemm_gflops", "lstm_step_op", "mlp_step_op",
           "sgemm_gflops"]
