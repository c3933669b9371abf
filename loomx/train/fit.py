"""``fit``: mini-batch gradient descent with validation, early stopping and checkpoints.

One optimizer update ("step") consumes ``accumulate`` mini-batches: each mini-batch runs
forward and backward, its loss gradient weighted by its share of the samples, and the layer
gradients add up (the layer protocol accumulates), so ``accumulate=k`` with ``batch_size=b``
gives the same update as one batch of ``k·b``. Then the gradients are clipped (optional), the
schedule sets the learning rate, the optimizer updates every parameter, and the gradients are
zeroed.

Host syncs happen only at declared points: every ``log_every`` steps (the interval loss, and a
NaN check that names the first bad step, tracked on the device), at epoch ends (metrics,
validation) and when a checkpoint is written.

Checkpoints (``checkpoint=path``) hold the weights, the optimizer buffers, the schedule, the
step, the epoch, the position inside the epoch, the shuffling generator state, the running
metric sums and the history; ``resume=True`` continues from one and reproduces the
uninterrupted run bit for bit (with ``workers > 1``, for networks without random layers).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, FormatError, LoomxError, TrainingError
from ..layers.base import Layer, ParamRef
from .batching import (
    DataSource,
    batch_slices,
    input_source,
    validate_pair,
    wide_dtype,
    widened,
)
from .callbacks import Callback, as_callback
from .clip import clip_grad_norm, clip_grad_value
from .evaluate import loss_and_correct, predicted_labels
from .history import History
from .losses import Loss, get_loss
from .optim import Optimizer, get_optimizer
from .parallel import BatchParallel
from .schedules import Schedule, get_schedule

Array = Any


@dataclass
class FitState:
    """The live state of a ``fit`` run (what callbacks see and checkpoints store)."""

    net: Layer
    optimizer: Optimizer
    schedule: Schedule
    history: History
    epochs: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    stop_training: bool = False
    epoch_rng_state: dict | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    best_weights: dict[str, Array] | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class _Trainer:
    """Implementation of :func:`fit` (one instance per call)."""

    def __init__(self, net, x, y, *, loss, optimizer, lr, schedule, epochs, batch_size,
                 validation_data, validation_split, shuffle, seed, early_stopping, monitor,
                 min_delta, restore_best_weights, checkpoint, checkpoint_every, resume,
                 callbacks, progress, log_every, clip_norm, clip_value, accumulate,
                 eval_batch_size, optimizer_options, workers):
        for label, v, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                              ("accumulate", accumulate, 1), ("log_every", log_every, 1),
                              ("eval_batch_size", eval_batch_size, 1)):
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"{label} must be an integer ≥ {low}, got {v!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer ≥ 1, got {workers!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ConfigError(f"checkpoint_every must be a positive integer of steps, "
                              f"got {checkpoint_every!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ConfigError(f"validation_split must be in [0, 1), got {validation_split}")
        if validation_split and validation_data is not None:
            raise ConfigError("give either validation_data or validation_split, not both")
        if resume and checkpoint is None:
            raise ConfigError("resume=True needs checkpoint=path")
        if not net.built:
            if not hasattr(x, "shape"):
                raise LoomxError("x must be an array [N, ...]")
            net.build(tuple(x.shape[1:]))
        self.net = net
        self.backend = b = net.backend
        self.xp = b.xp
        self.loss: Loss = get_loss(loss)
        xs, ys = input_source(net, x, "x"), DataSource(y, b, "y")
        validate_pair(net, xs, ys, self.loss)
        self.val: tuple[DataSource, DataSource] | None = None
        if validation_split:
            n_val = max(1, int(round(len(xs) * validation_split)))
            if n_val >= len(xs):
                raise ConfigError(f"validation_split {validation_split} leaves no training "
                                  f"samples out of {len(xs)}")
            cut = len(xs) - n_val
            self.val = (xs.subset(cut, len(xs)), ys.subset(cut, len(ys)))
            xs, ys = xs.subset(0, cut), ys.subset(0, cut)
        elif validation_data is not None:
            if len(validation_data) != 2:
                raise ConfigError("validation_data must be a pair (x_val, y_val)")
            xv = input_source(net, validation_data[0], "validation x")
            yv = DataSource(validation_data[1], b, "validation y")
            validate_pair(net, xv, yv, self.loss)
            self.val = (xv, yv)
        self.xs, self.ys = xs, ys
        # accuracy: integer labels with a softmax loss, or 0/1 labels of a one-output binary
        # classifier (bce_logits, bce)
        self.n_out = int(net.output_shape[-1])
        # accuracy wherever the labels are integers, as validation reports it (the rule of
        # evaluate.predicted_labels: argmax, or the threshold of a one-output loss)
        self.count_correct = ys.is_integer

        self.batch_size, self.accumulate = batch_size, accumulate
        self.shuffle, self.seed = bool(shuffle), seed
        self.log_every, self.eval_batch_size = log_every, eval_batch_size
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.callbacks: list[Callback] = [as_callback(c) for c in callbacks]
        self.progress = progress

        opt = get_optimizer(optimizer, net, lr, **(optimizer_options or {}))
        n_batches = len(batch_slices(len(xs), batch_size))
        steps_per_epoch = math.ceil(n_batches / accumulate)
        sched = get_schedule(schedule, lr=opt.initial_lr,
                             total_steps=max(1, epochs * steps_per_epoch))
        self.rng: RandomSource = b.random(seed)
        self.state = FitState(net=net, optimizer=opt, schedule=sched, history=History(),
                              epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.schedule_given = isinstance(schedule, Schedule)
        self.track_best = early_stopping is not None or restore_best_weights
        self.patience = early_stopping
        self.monitor = monitor or ("val_loss" if self.val is not None else "loss")
        if self.track_best and self.monitor not in self._epoch_metric_names():
            raise ConfigError(f"cannot monitor {self.monitor!r}: the epoch metrics of this run "
                              f"are {sorted(self._epoch_metric_names())}")
        self.maximize = "acc" in self.monitor
        self.min_delta = float(min_delta)
        self.restore_best = bool(restore_best_weights)
        self._reset_epoch_sums()
        self._reset_interval()
        self._first_bad = b.asarray(-1, dtype=self.xp.int64)
        if resume and os.path.exists(checkpoint):
            self._restore(checkpoint)
        # forward, loss and backward of each mini-batch, split over `workers` threads when > 1
        self.steps = BatchParallel(net, workers)

    def _epoch_metric_names(self) -> set[str]:
        """The names :meth:`_end_epoch` reports for this run (what ``monitor`` may name)."""
        names = {"loss", "lr"}
        if self.count_correct:
            names.add("accuracy")
        if self.val is not None:
            names.add("val_loss")
            if self.val[1].is_integer:
                names.add("val_accuracy")
        return names

    # ------------------------------------------------------------------ accumulators
    def _reset_epoch_sums(self) -> None:
        self.epoch_loss: Array | None = None
        self.epoch_correct: Array | None = None
        self.epoch_n = 0

    def _reset_interval(self) -> None:
        self.interval_loss: Array | None = None
        self.interval_n = 0

    @staticmethod
    def _add(total: Array | None, value: Array) -> Array:
        return value if total is None else total + value

    def _host(self, value: Array) -> Any:
        return self.backend.to_host(value).tolist()

    # ------------------------------------------------------------------ the loop
    def run(self) -> History:
        st = self.state
        st.optimizer.zero_grad()
        bar = _progress_bar()(total=st.total_steps, initial=st.step, disable=not self.progress,
                   unit="step", dynamic_ncols=True, leave=True)
        try:
            for cb in self.callbacks:
                cb.on_train_begin(st)
            while st.epoch < st.epochs and not st.stop_training:
                bar.set_description(f"epoch {st.epoch + 1}/{st.epochs}")
                try:
                    self._run_epoch(bar)
                except TrainingError as exc:
                    if not (self.restore_best and st.best_weights is not None):
                        raise
                    self._set_weights(st.best_weights)
                    raise TrainingError(f"{exc}; the weights of the best epoch "
                                        f"({st.best_epoch + 1}) were put back") from exc
            if self.restore_best and st.best_weights is not None:
                self._set_weights(st.best_weights)
            for cb in self.callbacks:
                cb.on_train_end(st)
        finally:
            bar.close()
            self.steps.close()
        st.history.steps = st.step
        return st.history

    def _run_epoch(self, bar) -> None:
        st = self.state
        st.epoch_rng_state = self.rng.get_state()
        n = len(self.xs)
        order = self.rng.permutation(n) if self.shuffle else list(range(n))
        micro = [[order[i] for i in r] for r in batch_slices(n, self.batch_size)]
        groups = [micro[i:i + self.accumulate] for i in range(0, len(micro), self.accumulate)]
        for gi in range(st.step_in_epoch, len(groups)):
            self._train_step(groups[gi])
            st.step_in_epoch = gi + 1
            bar.update(1)
            for cb in self.callbacks:
                cb.on_step_end(st)
            if st.step % self.log_every == 0:
                self._log(bar)
            if st.stop_training:
                return
            if (self.checkpoint and self.checkpoint_every and gi + 1 < len(groups)
                    and st.step % self.checkpoint_every == 0):
                self._save(self.checkpoint)
        self._end_epoch(bar)

    def _train_step(self, group: Sequence[Sequence[int]]) -> None:
        st, xp = self.state, self.xp
        total = sum(len(mb) for mb in group)
        step_no = st.step + 1
        for mb in group:
            xb, yb = self.xs.take(mb), self.ys.take(mb)
            shards = self.steps.forward_backward(xb, yb, self.loss, total=total)
            for shard in shards:
                n = shard.rows.stop - shard.rows.start
                weighted = widened(self.backend, shard.value) * n
                self.epoch_loss = self._add(self.epoch_loss, weighted)
                self.interval_loss = self._add(self.interval_loss, weighted)
                self.epoch_n += n
                self.interval_n += n
                bad = ~xp.isfinite(shard.value) & (self._first_bad < 0)
                self._first_bad = xp.where(bad, step_no, self._first_bad)
                if self.count_correct:
                    ys = yb if len(shards) == 1 else yb[shard.rows, ...]
                    pred = predicted_labels(xp, shard.out, self.loss, ys.dtype)
                    hits = xp.sum(xp.astype(pred == ys, xp.int64))
                    self.epoch_correct = self._add(self.epoch_correct, hits)
        if self.clip_value is not None:
            clip_grad_value(st.optimizer.params, self.clip_value)
        if self.clip_norm is not None:
            clip_grad_norm(st.optimizer.params, self.clip_norm)
        st.optimizer.lr = st.schedule(st.step)
        st.optimizer.step()
        st.optimizer.zero_grad()
        st.step = step_no

    # ------------------------------------------------------------------ sync points
    def _check_finite(self) -> None:
        bad = int(self._host(self._first_bad))
        if bad >= 0:
            st = self.state
            raise TrainingError(
                f"the loss became NaN or infinite at step {bad} (epoch {st.epoch + 1}, detected "
                f"at step {st.step}); lower the learning rate (now {st.optimizer.lr:g}), "
                "check the data, or clip gradients with clip_norm=")

    def _log(self, bar) -> None:
        if self.interval_n == 0:
            return
        self._check_finite()
        st = self.state
        loss = self._host(self.interval_loss) / self.interval_n
        logs = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": st.optimizer.lr}
        st.history.log.append(logs)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        for cb in self.callbacks:
            cb.on_log(st, dict(logs))
        self._reset_interval()

    def _end_epoch(self, bar) -> None:
        st = self.state
        if self.interval_n == 0:
            self._check_finite()  # _log checks otherwise: no epoch ends with a NaN unseen
        self._log(bar)
        values: dict[str, float] = {"loss": self._host(self.epoch_loss) / self.epoch_n}
        if self.epoch_correct is not None:
            values["accuracy"] = self._host(self.epoch_correct) / self.epoch_n
        values["lr"] = st.optimizer.lr
        if self.val is not None:
            vloss, vcorrect = loss_and_correct(self.net, *self.val, self.loss,
                                               self.eval_batch_size)
            values["val_loss"] = vloss
            if vcorrect is not None:
                values["val_accuracy"] = vcorrect / len(self.val[0])
        st.history.append_epoch(st.epoch, values)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k != "lr"},
                        refresh=True)
        if self.track_best:
            self._track_best(values)
        for cb in self.callbacks:
            cb.on_epoch_end(st, dict(values))
        st.epoch += 1
        st.step_in_epoch = 0
        self._reset_epoch_sums()
        if self.checkpoint:
            self.state.epoch_rng_state = self.rng.get_state()
            self._save(self.checkpoint)

    def _track_best(self, values: dict[str, float]) -> None:
        st = self.state
        if self.monitor not in values:
            raise ConfigError(f"cannot monitor {self.monitor!r}: the epoch metrics are "
                              f"{sorted(values)}")
        v = values[self.monitor]
        if st.best_value is None:
            better = True
        elif self.maximize:
            better = v > st.best_value + self.min_delta
        else:
            better = v < st.best_value - self.min_delta
        if better:
            st.best_value, st.best_epoch, st.wait = v, st.epoch, 0
            if self.restore_best:
                # one copy per array: tied entries share it, so restoring keeps the tie
                st.best_weights = {}
                for group in self._tie_groups():
                    saved = self.xp.asarray(group[0].value, copy=True)
                    st.best_weights.update((p.name, saved) for p in group)
        else:
            st.wait += 1
            if self.patience is not None and st.wait >= self.patience:
                st.stop_training = True
                st.history.stopped_epoch = st.epoch
        st.history.best_epoch, st.history.best_value = st.best_epoch, st.best_value

    # ------------------------------------------------------------------ weights
    def _tie_groups(self) -> list[list[ParamRef]]:
        """The network's parameters grouped by the array they hold: entries that share one
        array (tied weights) form one group, in first-seen order."""
        groups: dict[int, list[ParamRef]] = {}
        for p in self.net.parameters():
            groups.setdefault(id(p.value), []).append(p)
        return list(groups.values())

    def _set_weights(self, weights: dict[str, Array]) -> None:
        """Put ``weights`` (by parameter name) back; every entry of a tied group gets the
        group's first entry's array, so the tie lasts."""
        for group in self._tie_groups():
            value = weights[group[0].name]
            for p in group:
                p.value = value

    def _layer_rngs(self) -> dict[str, RandomSource]:
        """Random sources held by layers (e.g. dropout masks), by parameter-style path."""
        found: dict[str, RandomSource] = {}

        def walk(layer: Layer, prefix: str) -> None:
            for attr, v in vars(layer).items():
                if isinstance(v, RandomSource):
                    found[f"{prefix}{attr}"] = v
            for cname, child in layer.children():
                walk(child, f"{prefix}{cname}.")

        walk(self.net, "")
        return found

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict:
        return {"samples": len(self.xs), "batch_size": self.batch_size,
                "accumulate": self.accumulate, "shuffle": self.shuffle, "seed": self.seed,
                "epochs": self.state.epochs}

    def _save(self, path: str | os.PathLike) -> None:
        from ..io.checkpoint import save_checkpoint

        self._check_finite()
        st, to_host = self.state, self.backend.to_host
        tensors = {f"weights/{p.name}": to_host(p.value) for p in self.net.parameters()}
        opt_state = st.optimizer.state_dict()
        for pname, bufs in opt_state.pop("buffers").items():
            for k, host in bufs.items():
                tensors[f"optim/{pname}/{k}"] = host
        if st.best_weights is not None:
            tensors.update({f"best/{k}": to_host(v) for k, v in st.best_weights.items()})

        def host_or_none(v):
            return None if v is None else self._host(v)

        meta = {
            "step": st.step, "epoch": st.epoch, "step_in_epoch": st.step_in_epoch,
            "epoch_rng_state": st.epoch_rng_state,
            "layer_rngs": {k: r.get_state() for k, r in self._layer_rngs().items()},
            "optimizer": opt_state, "schedule": st.schedule.get_config(),
            "schedule_state": st.schedule.state_dict(),
            "history": st.history.to_dict(), "settings": self._settings(),
            "best": {"value": st.best_value, "epoch": st.best_epoch, "wait": st.wait},
            "sums": {"epoch_loss": host_or_none(self.epoch_loss),
                     "epoch_correct": host_or_none(self.epoch_correct),
                     "epoch_n": self.epoch_n, "interval_loss": host_or_none(self.interval_loss),
                     "interval_n": self.interval_n},
        }
        save_checkpoint(path, tensors, meta)

    def _restore(self, path: str | os.PathLike) -> None:
        from ..io.checkpoint import load_checkpoint

        tensors, meta = load_checkpoint(path)
        st, b, xp = self.state, self.backend, self.xp
        if meta.get("settings") != self._settings():
            raise ConfigError(f"checkpoint {path} was written with settings "
                              f"{meta.get('settings')}, but this run uses {self._settings()}; "
                              "resume with the same data, batch_size, accumulate, shuffle, "
                              "seed and epochs")
        groups = self._tie_groups()
        for group in groups:
            for p in group:
                host = tensors.get(f"weights/{p.name}")
                if host is None or tuple(host.shape) != tuple(p.value.shape):
                    raise FormatError(f"checkpoint {path} does not match the network: "
                                      f"parameter {p.name} {list(p.value.shape)} is "
                                      f"{'missing' if host is None else list(host.shape)} "
                                      "there")
        # one array per group: entries tied in this network stay tied
        best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
        best_weights: dict[str, Array] = {}
        for group in groups:
            head = group[0]
            dtype = head.value.dtype
            value = b.from_host(tensors[f"weights/{head.name}"], dtype=dtype)
            saved = best.get(head.name)
            saved = None if saved is None else b.from_host(saved, dtype=dtype)
            for p in group:
                p.value = value
                if saved is not None:
                    best_weights[p.name] = saved
        opt_state = dict(meta["optimizer"])
        # one buffer set per distinct parameter (tied entries share their first entry's)
        buffers: dict[str, dict[str, Any]] = {name: {} for name in st.optimizer.state}
        for key, host in tensors.items():
            if key.startswith("optim/"):
                pname, _, buf = key[len("optim/"):].rpartition("/")
                buffers.setdefault(pname, {})[buf] = host
        opt_state["buffers"] = buffers
        st.optimizer.load_state_dict(opt_state)
        if self.schedule_given:
            # the instance passed in (any Schedule subclass) continues from its saved state
            st.schedule.load_state_dict(meta.get("schedule_state") or {})
        else:
            st.schedule = get_schedule(meta["schedule"])
        st.best_weights = best_weights or None
        st.best_value, st.best_epoch = meta["best"]["value"], meta["best"]["epoch"]
        st.wait = meta["best"]["wait"]
        st.history = History.from_dict(meta["history"])
        st.step, st.epoch = meta["step"], meta["epoch"]
        st.step_in_epoch = meta["step_in_epoch"]
        self.rng.set_state(meta["epoch_rng_state"])
        for k, r in self._layer_rngs().items():
            if k in meta["layer_rngs"]:
                r.set_state(meta["layer_rngs"][k])
        sums = meta["sums"]
        fdt, idt = wide_dtype(b), xp.int64  # the running sums' dtype (_train_step)
        self.epoch_loss = None if sums["epoch_loss"] is None else b.asarray(sums["epoch_loss"],
                                                                             dtype=fdt)
        self.epoch_correct = None if sums["epoch_correct"] is None else \
            b.asarray(sums["epoch_correct"], dtype=idt)
        self.interval_loss = None if sums["interval_loss"] is None else \
            b.asarray(sums["interval_loss"], dtype=fdt)
        self.epoch_n, self.interval_n = sums["epoch_n"], sums["interval_n"]
        st.stop_training = st.history.stopped_epoch is not None


def _progress_bar():
    """``tqdm.auto.tqdm``: a widget in notebooks with ipywidgets, text elsewhere (quietly)."""
    import warnings

    from tqdm import TqdmExperimentalWarning, TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.auto import tqdm
    return tqdm


def fit(net: Layer, x: Any, y: Any, *, loss: str | Loss = "cross_entropy",
        optimizer: str | Optimizer = "adam", lr: float | None = None,
        schedule: str | dict | Schedule | None = None, epochs: int = 10, batch_size: int = 32,
        validation_data: tuple[Any, Any] | None = None, validation_split: float = 0.0,
        shuffle: bool = True, seed: int = 0, early_stopping: int | None = None,
        monitor: str | None = None, min_delta: float = 0.0,
        restore_best_weights: bool = False, checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, resume: bool = False,
        callbacks: Sequence[Callback | Callable] = (), progress: bool = True,
        log_every: int = 10, clip_norm: float | None = None, clip_value: float | None = None,
        accumulate: int = 1, eval_batch_size: int = 256,
        optimizer_options: dict | None = None, workers: int = 1) -> History:
    """Train ``net`` on ``(x, y)`` with mini-batch gradient descent.

    Args:
        net: a network (built, or built here from ``x.shape[1:]``).
        x: inputs ``[N, *input_shape]``, a host (numpy) array or a device array.
        y: integer labels ``[N]`` or float targets ``[N, *output_shape]``. For a network with
            one output, integer labels are the targets themselves (``[N, 1]`` floats): 0/1 for
            a binary classifier with ``loss="bce_logits"`` (accuracy: logit > 0) or ``"bce"``
            (probability > 0.5), any integers for a regression with ``"mse"``.
        loss: ``"cross_entropy"`` (logits), ``"cross_entropy_probs"``, ``"mse"``, ``"bce"``,
            ``"bce_logits"`` or a :class:`~loomx.train.losses.Loss`.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"sgd_momentum"``, ``"nesterov"``,
            ``"rmsprop"`` or an :class:`~loomx.train.optim.Optimizer` built on ``net`` (one
            holding another network's parameters is refused).
        lr: base learning rate (default: the optimizer's).
        schedule: a schedule name, config dict or object (``lr`` and ``total_steps`` filled
            in). A resumed run keeps an object (any :class:`Schedule` subclass) and restores
            its ``state_dict()``; a name or dict is rebuilt from the checkpoint.
        epochs, batch_size: passes over the data and samples per mini-batch.
        validation_data / validation_split: held-out pair, or the last fraction of ``(x, y)``.
        shuffle, seed: reshuffle every epoch from a generator seeded with ``seed``.
        early_stopping: patience in epochs without improvement of ``monitor`` (default
            ``val_loss``, else ``loss``; names containing ``acc`` are maximised) by
            more than ``min_delta``. A ``monitor`` that the run does not report is refused
            before any step.
        restore_best_weights: at the end, and when a NaN/Inf loss stops training, put back
            the weights of the best monitored epoch (tied weights stay tied).
        checkpoint: file written atomically at every epoch end (and every
            ``checkpoint_every`` steps); ``resume=True`` continues from it when it exists.
        callbacks: :class:`~loomx.train.callbacks.Callback` objects or
            ``fn(state, logs)`` epoch-end functions.
        progress: show a progress bar (terminal or notebook).
        log_every: steps between host syncs (interval loss, NaN check, callbacks' ``on_log``).
        clip_norm, clip_value: gradient clipping by global norm / by value.
        accumulate: mini-batches per optimizer update (gradient accumulation).
        eval_batch_size: batch size of validation passes.
        optimizer_options: extra options for a named optimizer (e.g. ``{"momentum": 0.9}``);
            refused with an optimizer instance.
        workers: split every mini-batch over this many CPU threads
            (:class:`~loomx.train.parallel.BatchParallel`: the same gradients up to rounding,
            faster for convolutional networks on multi-core CPUs; numpy or PyTorch on the CPU
            only). Dropout masks then differ from a serial run, and a resumed run with random
            layers is not bitwise identical to an uninterrupted one.

    Returns:
        the :class:`~loomx.train.history.History` of the run.

    Raises:
        LoomxError: bad data (shapes, sample counts, NaN, label range) before any step.
        ConfigError: bad settings (a ``monitor`` the run does not report, a foreign optimizer
            instance...) before any step.
        TrainingError: the loss became NaN/Inf (the message names the step, and says when
            the best weights were put back).
    """
    return _Trainer(net, x, y, loss=loss, optimizer=optimizer, lr=lr, schedule=schedule,
                    epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                    validation_split=validation_split, shuffle=shuffle, seed=seed,
                    early_stopping=early_stopping, monitor=monitor, min_delta=min_delta,
                    restore_best_weights=restore_best_weights, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, resume=resume, callbacks=callbacks,
                    progress=progress, log_every=log_every, clip_norm=clip_norm,
                    clip_value=clip_value, accumulate=accumulate,
                    eval_batch_size=eval_batch_size,
                    optimizer_options=optimizer_options, workers=workers).run()
