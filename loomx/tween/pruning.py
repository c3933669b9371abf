"""Dead-layer pruning for tweening (Loom's ``checkAndPruneLayers``), with consistent bookkeeping.

At the end of every epoch, each layer other than the first and the last one counts a "dead
epoch" while its epoch-mean link budget is below ``prune_threshold`` (reset otherwise). The
first layer dead for ``prune_patience`` epochs is disabled (``layer.disabled = True``: the
identity in the forward pass) together with the next ones, up to three layers as in Loom. A
layer that stays disabled for ``prune_patience`` more epochs is removed from its grid slot.

Differences from Loom, on purpose: only shape-preserving layers (input shape = output shape)
are disabled, since an identity cannot stand in for a layer that changes the width; disabled
layers are skipped by the tween backward and updates; every per-layer record (velocities,
dead-epoch counters, best-state copies) is keyed by the layer itself or its grid slot, so a
removal cannot shift another layer's state. The best state saved by ``fit`` keeps each layer's
``disabled`` flag and the layer itself, so restoring it undoes pruning done after it where that
changes the network (a layer removed while enabled at the best goes back into its slot). Budgets
come from the telemetry, or with ``telemetry=False`` from a per-epoch device tally. Any grid
shape is accepted (Loom: 1 × 1 only).
"""

from __future__ import annotations


def _preserves_shape(layer) -> bool:
    return layer.input_shape is not None and tuple(layer.input_shape) == tuple(
        layer.output_shape or ())


def remove_layer(trainer, index: int) -> None:
    """Empty grid slot ``index`` and drop the trainer's training records for its layer
    (velocities, dead-epoch counter). The best state keeps its copy: it holds the layer
    itself, so :meth:`~loomx.tween.trainer.TweenTrainer.restore_best` can put the layer back
    when it was enabled at the best evaluation."""
    layer = trainer.net.slots[index]
    if layer is None:
        return
    ids = {id(ref.layer) for ref in layer.parameters()} | {id(layer)}
    for key in [k for k in trainer.velocity if k[0] in ids]:
        del trainer.velocity[key]
    trainer.dead_epochs.pop(index, None)
    trainer.net.slots[index] = None
    trainer.removed.append(index)


def prune_epoch(trainer, budgets: dict[int, float]) -> list[str]:
    """Update dead-epoch counters from the epoch-mean link ``budgets`` (flat slot index →
    budget, :meth:`~loomx.tween.trainer.TweenTrainer.epoch_budgets`); disable or remove layers.

    Returns human-readable messages about what changed (empty when nothing did).
    """
    cfg = trainer.config
    occupied = trainer.net.layers()
    if len(occupied) < 3:
        return []
    first, last = occupied[0][0], occupied[-1][0]
    candidates = [(i, layer) for i, layer in occupied if first < i < last]
    dead = trainer.dead_epochs
    messages: list[str] = []
    for idx, layer in candidates:
        if layer.disabled:
            dead[idx] = dead.get(idx, 0) + 1
            if dead[idx] >= cfg.prune_patience:
                remove_layer(trainer, idx)
                messages.append(f"pruning: removed layer {idx} after {cfg.prune_patience} "
                                "disabled epochs")
                return messages
        elif budgets.get(idx, 1.0) < cfg.prune_threshold:
            dead[idx] = dead.get(idx, 0) + 1
        else:
            dead[idx] = 0
    for k, (idx, layer) in enumerate(candidates):
        if layer.disabled or dead.get(idx, 0) < cfg.prune_patience:
            continue
        group = [(i, c) for i, c in candidates[k:k + 3] if not c.disabled and _preserves_shape(c)]
        for i, c in group:
            c.disabled = True
            dead[i] = 0
        if group:
            messages.append(f"pruning: disabled layers {[i for i, _ in group]} (budget below "
                            f"{cfg.prune_threshold} for {cfg.prune_patience} epochs)")
        break
    return messages
