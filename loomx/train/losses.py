"""Loss functions with their gradients, written once against ``xp``.

Every loss is called as ``loss(output, target) -> (value, grad)``:

- ``output``: the network output, ``[B, C]`` (or ``[B, ...]`` for MSE and BCE);
- ``target``: integer class labels ``[B]`` (cross-entropy, and MSE/BCE after one-hot encoding;
  for an output ``[B, 1]`` the labels are the targets themselves, e.g. 0/1 for a binary
  classifier with ``bce_logits``) or a float array shaped like ``output``;
- ``value``: the mean loss as a 0-d device array (no host sync);
- ``grad``: ``d value / d output``, shaped like ``output``.

=======================  =================================================  ====================
name                     value                                              gradient
=======================  =================================================  ====================
``mse``                  mean over all elements of (o - t)²                 2(o - t)/N
``cross_entropy``        mean over samples of -Σ t·log_softmax(o)           (softmax(o) - t)/B
``cross_entropy_probs``  mean over samples of -Σ t·log(clip(p, ε, 1 - ε))   -t/clip(p)/B
``bce_logits``           mean over elements of softplus(o) - t·o            (σ(o) - t)/N
``bce``                  mean of -(t·log p + (1 - t)·log(1 - p)), p clipped (p - t)/(p(1 - p))/N
=======================  =================================================  ====================

``cross_entropy`` works on logits with a fused, stable log-softmax (shift by the row max).
Loom divides its losses by the number of output elements; loomx averages over samples
(as PyTorch does), so the learning rate does not depend on the number of classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import kernel_for
from ..errors import ConfigError, ShapeError
from ..layers.activations import sigmoid

Array = Any

PROB_EPS = 1e-7


def one_hot(xp, labels: Array, num_classes: int, dtype, device) -> Array:
    """``labels [B]`` (int) → ``[B, num_classes]`` one-hot in ``dtype`` (no boolean indexing)."""
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device)
    return xp.astype(labels[:, None] == classes[None, :], dtype)


def _is_int(xp, a: Array) -> bool:
    return xp.isdtype(a.dtype, "integral")


def _dense_target(xp, output: Array, target: Array, device, loss_name: str) -> Array:
    """Targets as a float array shaped like ``output``: int labels ``[B]`` are one-hot encoded
    for an output ``[B, C]`` with ``C > 1``, and are the targets themselves (``[B, 1]``, e.g.
    0/1 for a binary classifier) for an output ``[B, 1]``."""
    if _is_int(xp, target):
        if output.ndim != 2 or target.ndim != 1 or target.shape[0] != output.shape[0]:
            raise ShapeError(f"{loss_name}: integer labels must be [B] for an output [B, C]; "
                             f"got labels {list(target.shape)} and output {list(output.shape)}")
        if output.shape[1] == 1:
            return xp.reshape(xp.astype(target, output.dtype), (-1, 1))
        return one_hot(xp, target, output.shape[1], output.dtype, device)
    if tuple(target.shape) != tuple(output.shape):
        raise ShapeError(f"{loss_name}: target shape {list(target.shape)} does not match the "
                         f"output shape {list(output.shape)}")
    return xp.astype(target, output.dtype, copy=False)


def _check_classes(xp, output: Array, target: Array, loss_name: str) -> None:
    """A softmax over one output is constant: refuse integer labels for an output ``[B, 1]``."""
    if output.shape[1] == 1 and _is_int(xp, target):
        raise ShapeError(f"{loss_name} needs an output [B, C] with C ≥ 2 for integer labels; "
                         "for a binary classifier with one output use bce_logits (or bce "
                         "after a sigmoid)")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _namespace_and_device(output: Array):
    from array_api_compat import array_namespace, device

    return array_namespace(output), device(output)


def mse(output: Array, target: Array) -> tuple[Array, Array]:
    """Mean squared error over all elements. Shapes: ``output [B, ...]``; ``target`` alike or
    int labels ``[B]`` for ``output [B, C]``."""
    xp, dev = _namespace_and_device(output)
    t = _dense_target(xp, output, target, dev, "mse")
    diff = output - t
    n = _count(output.shape)
    return xp.sum(diff * diff) / n, diff * (2.0 / n)


def cross_entropy(output: Array, target: Array) -> tuple[Array, Array]:
    """Softmax cross-entropy from logits ``[B, C]``; ``target`` int labels ``[B]`` or
    probabilities ``[B, C]``. Fused and stable: ``log_softmax = z - max - log Σ exp(z - max)``."""
    xp, dev = _namespace_and_device(output)
    if output.ndim != 2:
        raise ShapeError(f"cross_entropy expects logits [B, C], got {list(output.shape)}")
    _check_classes(xp, output, target, "cross_entropy")
    t = _dense_target(xp, output, target, dev, "cross_entropy")
    fused = kernel_for(output, "softmax_cross_entropy")
    result = None if fused is None else fused(output, t)  # None: a case it does not take
    return cross_entropy_reference(xp, output, t) if result is None else result


def cross_entropy_reference(xp, output: Array, t: Array) -> tuple[Array, Array]:
    """:func:`cross_entropy` on the array API, from dense targets ``t [B, C]`` (the reference
    of the ``softmax_cross_entropy`` kernel)."""
    shifted = output - xp.max(output, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=1, keepdims=True)
    log_probs = shifted - xp.log(total)
    b = output.shape[0]
    value = -xp.sum(t * log_probs) / b
    grad = (exp / total * xp.sum(t, axis=1, keepdims=True) - t) / b
    return value, grad


def cross_entropy_probs(output: Array, target: Array) -> tuple[Array, Array]:
    """Cross-entropy from probabilities ``[B, C]`` (e.g. after a Softmax layer), clipped to
    ``[1e-7, 1 - 1e-7]`` as Loom does; ``target`` int labels ``[B]`` or probabilities."""
    xp, dev = _namespace_and_device(output)
    if output.ndim != 2:
        raise ShapeError(f"cross_entropy_probs expects probabilities [B, C], "
                         f"got {list(output.shape)}")
    _check_classes(xp, output, target, "cross_entropy_probs")
    t = _dense_target(xp, output, target, dev, "cross_entropy_probs")
    p = xp.clip(output, PROB_EPS, 1.0 - PROB_EPS)
    b = output.shape[0]
    inside = xp.astype((output > PROB_EPS) & (output < 1.0 - PROB_EPS), output.dtype)
    return -xp.sum(t * xp.log(p)) / b, -(t / p) * inside / b


def bce_logits(output: Array, target: Array) -> tuple[Array, Array]:
    """Binary cross-entropy from logits, mean over all elements (stable softplus form)."""
    xp, dev = _namespace_and_device(output)
    t = _dense_target(xp, output, target, dev, "bce_logits")
    n = _count(output.shape)
    softplus = xp.maximum(output, 0.0) + xp.log1p(xp.exp(-xp.abs(output)))
    return xp.sum(softplus - t * output) / n, (sigmoid(xp, output) - t) / n


def bce(output: Array, target: Array) -> tuple[Array, Array]:
    """Binary cross-entropy from probabilities in (0, 1), clipped to ``[1e-7, 1 - 1e-7]``."""
    xp, dev = _namespace_and_device(output)
    t = _dense_target(xp, output, target, dev, "bce")
    n = _count(output.shape)
    p = xp.clip(output, PROB_EPS, 1.0 - PROB_EPS)
    value = -xp.sum(t * xp.log(p) + (1.0 - t) * xp.log(1.0 - p)) / n
    inside = xp.astype((output > PROB_EPS) & (output < 1.0 - PROB_EPS), output.dtype)
    return value, (p - t) / (p * (1.0 - p)) * inside / n


@dataclass(frozen=True)
class Loss:
    """A named loss: ``fn(output, target) -> (value, grad)``.

    ``classification``: targets are class labels and accuracy is meaningful;
    ``output_kind``: what the network outputs (``"logits"``, ``"probabilities"``, ``"values"``).
    """

    name: str
    fn: Callable[[Array, Array], tuple[Array, Array]]
    classification: bool
    output_kind: str

    def __call__(self, output: Array, target: Array) -> tuple[Array, Array]:
        return self.fn(output, target)


LOSSES: dict[str, Loss] = {
    "mse": Loss("mse", mse, False, "values"),
    "cross_entropy": Loss("cross_entropy", cross_entropy, True, "logits"),
    "cross_entropy_probs": Loss("cross_entropy_probs", cross_entropy_probs, True,
                                "probabilities"),
    "bce_logits": Loss("bce_logits", bce_logits, False, "logits"),
    "bce": Loss("bce", bce, False, "probabilities"),
}
_ALIASES = {"mean_squared_error": "mse", "ce": "cross_entropy",
            "categorical_crossentropy": "cross_entropy", "nll": "cross_entropy_probs",
            "binary_cross_entropy": "bce", "binary_cross_entropy_with_logits": "bce_logits"}


def get_loss(loss: str | Loss) -> Loss:
    """A :class:`Loss` by name (see the module table) or the object itself."""
    if isinstance(loss, Loss):
        return loss
    key = _ALIASES.get(str(loss).lower(), str(loss).lower())
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[key]
