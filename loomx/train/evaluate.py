"""``evaluate(net, x, y)``: loss, accuracy, confusion matrix and Loom's deviation metrics.

Batches run forward in inference mode; sums stay on the device and reach the host once at the
end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LoomxError
from .batching import (
    DataSource,
    batch_slices,
    input_source,
    validate_pair,
    wide_dtype,
    widened,
)
from .losses import Loss, get_loss, one_hot
from .metrics import DeviationMetrics

Array = Any


@dataclass
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean loss over all samples (``None`` when no loss applies).
        accuracy: fraction of samples whose predicted label matches the label (integer labels
            only; the argmax for ``[B, C]`` outputs, a threshold for one output, see
            :func:`predicted_labels`).
        deviation: Loom's deviation metrics (buckets, 0–100 score, per-sample results).
        confusion: ``[C, C]`` host array, rows = true class, columns = predicted (integer
            labels only; ``[2, 2]`` for a one-output binary classifier, none for a one-output
            regression with MSE).
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


def default_loss(y: DataSource, n_out: int | None = None) -> Loss:
    """Cross-entropy from logits for integer labels (binary cross-entropy from logits when the
    network has one output, ``n_out == 1``), MSE for float targets."""
    if not y.is_integer:
        return get_loss("mse")
    return get_loss("bce_logits" if n_out == 1 else "cross_entropy")


def predicted_labels(xp, out: Array, loss: Loss, dtype) -> Array:
    """The label predicted for each row of ``out [B, C]``, ``[B]`` in ``dtype``.

    ``C > 1``: the argmax class. ``C == 1`` (integer labels are the targets themselves): the
    threshold the loss implies, ``out > 0`` for logits, ``out > 0.5`` for probabilities, and
    the nearest integer for plain values (MSE).
    """
    if out.shape[1] > 1:
        return xp.argmax(out, axis=1)
    o = out[:, 0]
    if loss.output_kind == "logits":
        return xp.astype(o > 0.0, dtype)
    if loss.output_kind == "probabilities":
        return xp.astype(o > 0.5, dtype)
    return xp.astype(xp.round(o), dtype)


def loss_and_correct(net, x: DataSource, y: DataSource, loss: Loss,
                     batch_size: int) -> tuple[float, int | None]:
    """Mean loss and the number of correct predictions (see :func:`predicted_labels`;
    ``None`` for float targets)."""
    xp = net.backend.xp
    loss_sum = None
    correct = None
    for idx in batch_slices(len(x), batch_size):
        out, _ = net.forward(x.take(idx), train=False)
        yb = y.take(idx)
        value = widened(net.backend, loss(out, yb)[0]) * len(idx)
        loss_sum = value if loss_sum is None else loss_sum + value
        if y.is_integer:
            hits = xp.sum(xp.astype(predicted_labels(xp, out, loss, yb.dtype) == yb, xp.int64))
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
        loss: loss name or object (default: cross-entropy from logits for labels, binary
            cross-entropy from logits for labels on a one-output network, MSE for float
            targets). It also sets how a one-output network's prediction is read (see
            :func:`predicted_labels`).
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
    xs, ys = input_source(net, x, "x"), DataSource(y, b, "y")
    n_out = int(net.output_shape[-1])
    loss_obj = default_loss(ys, n_out) if loss is None else get_loss(loss)
    validate_pair(net, xs, ys, loss_obj)
    classify = ys.is_integer
    # a one-output binary classifier (labels 0/1) gets a 2 × 2 confusion matrix
    n_classes = n_out if n_out > 1 else (
        2 if loss_obj.output_kind in ("logits", "probabilities") else 0)
    loss_sum = correct = confusion = None
    wide = wide_dtype(b)  # confusion counts: exact up to 2**53 in float64
    expected_parts: list[Array] = []
    actual_parts: list[Array] = []
    for idx in batch_slices(len(xs), batch_size):
        out, _ = net.forward(xs.take(idx), train=False)
        yb = ys.take(idx)
        value = widened(b, loss_obj(out, yb)[0]) * len(idx)
        loss_sum = value if loss_sum is None else loss_sum + value
        if classify:
            pred = predicted_labels(xp, out, loss_obj, yb.dtype)
            hits = xp.sum(xp.astype(pred == yb, xp.int64))
            correct = hits if correct is None else correct + hits
            if n_classes:
                cm = xp.matmul(xp.matrix_transpose(one_hot(xp, yb, n_classes, wide, b.device)),
                               one_hot(xp, pred, n_classes, wide, b.device))
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
