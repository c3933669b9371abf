"""``evaluate(net, x, y)``: loss, accuracy, confusion matrix and Loom's deviation metrics.

Batches run forward in inference mode; sums stay on the device and reach the host once at the
end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LoomxError
from .batching import DataSource, batch_slices, validate_pair
from .losses import Loss, get_loss, one_hot
from .metrics import DeviationMetrics

Array = Any


@dataclass
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean loss over all samples (``None`` when no loss applies).
        accuracy: fraction of samples whose argmax matches the label (classification only).
        deviation: Loom's deviation metrics (buckets, 0–100 score, per-sample results).
        confusion: ``[C, C]`` host array, rows = true class, columns = predicted (classification
            only).
        samples: number of samples evaluated.
    """

    loss: float | None
    accuracy: float | None
    deviation: DeviationMetrics
    confusion: Any
    samples: int

    def as_dict(self) -> dict:
        """Scalar results (loss, accuracy, score, failures) for logs."""
        out = {"samples": self.samples, "score": self.deviation.score,
               "avg_deviation": self.deviation.average_deviation,
               "failures": self.deviation.failures}
        if self.loss is not None:
            out["loss"] = self.loss
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


def default_loss(y: DataSource) -> Loss:
    """Cross-entropy from logits for integer labels, MSE for float targets."""
    return get_loss("cross_entropy" if y.is_integer else "mse")


def loss_and_correct(net, x: DataSource, y: DataSource, loss: Loss,
                     batch_size: int) -> tuple[float, int | None]:
    """Mean loss and the number of correct argmax predictions (``None`` for float targets)."""
    xp = net.backend.xp
    loss_sum = None
    correct = None
    for idx in batch_slices(len(x), batch_size):
        out, _ = net.forward(x.take(idx), train=False)
        yb = y.take(idx)
        value, _ = loss(out, yb)
        loss_sum = value * len(idx) if loss_sum is None else loss_sum + value * len(idx)
        if y.is_integer:
            hits = xp.sum(xp.astype(xp.argmax(out, axis=1) == yb, xp.int64))
            correct = hits if correct is None else correct + hits
    host = net.backend.to_host
    mean_loss = float(host(loss_sum).tolist()) / len(x)
    return mean_loss, None if correct is None else int(host(correct).tolist())


def evaluate(net, x: Any, y: Any, *, loss: str | Loss | None = None, batch_size: int = 256,
             deviation: bool = True) -> Evaluation:
    """Evaluate ``net`` on ``(x, y)``.

    Args:
        net: a built network (or any layer).
        x: ``[N, *input_shape]`` host or device array.
        y: integer labels ``[N]`` or float targets ``[N, *output_shape]``.
        loss: loss name or object (default: cross-entropy for labels, MSE for float targets).
        batch_size: samples per forward pass.
        deviation: also compute Loom's deviation metrics (one value per sample: the argmax
            class for ``[B, C]`` outputs, the output itself for one-output networks; for float
            targets, one value per output element).

    Returns:
        an :class:`Evaluation`.
    """
    if not net.built:
        raise LoomxError("evaluate needs a built network: call net.build(input_shape) first")
    b = net.backend
    xp = b.xp
    xs, ys = DataSource(x, b, "x"), DataSource(y, b, "y")
    validate_pair(net, xs, ys)
    loss_obj = default_loss(ys) if loss is None else get_loss(loss)
    classify = ys.is_integer
    n_out = int(net.output_shape[-1])
    loss_sum = correct = confusion = None
    expected_parts: list[Array] = []
    actual_parts: list[Array] = []
    for idx in batch_slices(len(xs), batch_size):
        out, _ = net.forward(xs.take(idx), train=False)
        yb = ys.take(idx)
        value, _ = loss_obj(out, yb)
        loss_sum = value * len(idx) if loss_sum is None else loss_sum + value * len(idx)
        if classify:
            pred = xp.argmax(out, axis=1) if n_out > 1 else xp.astype(
                xp.round(out[:, 0]), yb.dtype)
            hits = xp.sum(xp.astype(pred == yb, xp.int64))
            correct = hits if correct is None else correct + hits
            if n_out > 1:
                cm = xp.matmul(xp.matrix_transpose(one_hot(xp, yb, n_out, b.float_dtype,
                                                            b.device)),
                               one_hot(xp, pred, n_out, b.float_dtype, b.device))
                confusion = cm if confusion is None else confusion + cm
            actual = xp.astype(xp.argmax(out, axis=1), b.float_dtype) if n_out > 1 \
                else out[:, 0]
            expected = xp.astype(yb, b.float_dtype)
        else:
            expected = xp.reshape(yb, (-1,))
            actual = xp.reshape(out, (-1,))
        if deviation:
            expected_parts.append(expected)
            actual_parts.append(actual)
    n = len(xs)
    host = b.to_host
    metrics = DeviationMetrics()
    if deviation:
        exp_host = host(xp.concat(expected_parts)).tolist()
        act_host = host(xp.concat(actual_parts)).tolist()
        metrics = DeviationMetrics.from_values(exp_host, act_host)
    return Evaluation(
        loss=float(host(loss_sum).tolist()) / n,
        accuracy=None if correct is None else int(host(correct).tolist()) / n,
        deviation=metrics,
        confusion=None if confusion is None else host(xp.astype(confusion, xp.int64)),
        samples=n)
