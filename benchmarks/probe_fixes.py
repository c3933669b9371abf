"""What-if timing: the loomx numpy step as it is against the same step with a proposed change.

``python -m benchmarks.probe_fixes`` changes one thing in this process only (never on disk)
and times "as is" and "patched" in alternating blocks at one thread, next to PyTorch and the
hand-written numpy step. It measures what a proposed library change would buy before anyone
makes it.

Probed change:

- ``no_input_grad``: the first layer of a network skips its input gradient (nothing reads it,
  and PyTorch does not compute it either). For workload a that is the 256×512 @ 512×784
  product, 20 % of the step's matrix-product FLOPs. Probed for a Dense first layer.
"""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _dense_backward_no_dx(self, dy, ctx):
    """Dense backward that accumulates the parameter gradients and returns no ``dx``."""
    from loomx.layers.activations import activation_backward
    from loomx.layers.dense import accumulate_linear_grads

    x, z, y = ctx
    dz = activation_backward(self.backend, self._act, z, y, dy)
    accumulate_linear_grads(self, x, dz, "weight", "bias" if self.bias else None)


def _model_of(op):
    from loomx.layers.base import Layer

    for cell in op.run.__closure__ or ():
        if isinstance(cell.cell_contents, Layer):
            return cell.cell_contents
    return None


def probe_no_input_grad(threads: int = 1) -> dict[str, float]:
    """Median ms of workload a: loomx[numpy] as is, without the first input gradient, PyTorch,
    plain numpy."""
    import torch
    from loomx.backends import get_backend

    from .timing import time_alternating
    from .workloads import mlp_case

    torch.set_num_threads(threads)
    case = mlp_case(False)
    backend = get_backend("numpy")
    patched = case.loomx(backend)
    first = _model_of(patched).layers()[0][1]
    first.backward = types.MethodType(_dense_backward_no_dx, first)
    ops = {"as is": case.loomx(backend), "patched": patched,
           "PyTorch": case.torch(torch.device("cpu")), "numpy (plain)": case.plain()}
    timings = time_alternating(ops, warmup=2, rounds=7, block=3)
    return {k: v.median * 1e3 for k, v in timings.items()}


def main() -> int:
    t = probe_no_input_grad()
    print("| case | change | as is ms | patched ms | change | PyTorch ms | plain numpy ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| a | no_input_grad | {t['as is']:.2f} | {t['patched']:.2f} | "
          f"{100 * (t['patched'] / t['as is'] - 1):+.0f} % | {t['PyTorch']:.2f} | "
          f"{t['numpy (plain)']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
