"""Optimizers over every parameter of a network (nested branches included).

Each optimizer walks ``net.parameters()`` (``ParamRef`` handles), so every parameter of every
layer is updated; Loom's optimizers only touch Dense and Conv2D kernels. The update rules match
``torch.optim`` exactly (same defaults, same placement of ε, same first-step momentum). All
arithmetic runs on the device with Python-float hyperparameters: a step never syncs.

========  ====================================================================================
SGD       g ← ∇ + λw;  b ← g (first step) else μb + (1 - τ)g;  g ← g + μb (Nesterov) or b;
          w ← w - η g
Adam      g ← ∇ + λw;  m ← β₁m + (1 - β₁)g;  v ← β₂v + (1 - β₂)g²;
          w ← w - η/(1 - β₁ᵗ) · m / (√v/√(1 - β₂ᵗ) + ε)      (AMSGrad: max of v over time)
AdamW     w ← w(1 - ηλ), then Adam without the λw term (decoupled decay)
RMSprop   g ← ∇ + λw;  s ← αs + (1 - α)g²;  d ← √s + ε (centred: √(s - ḡ²) + ε);
          b ← μb + g/d, w ← w - η b (μ > 0) or w ← w - η g/d
========  ====================================================================================

``state_dict()`` holds the hyperparameters, the step count and every moment buffer (host copies
made with ``backend.to_host``); ``load_state_dict()`` puts them back on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError, FormatError
from ..layers.base import Layer, ParamRef

Array = Any


class Optimizer:
    """Base class: holds the parameter handles, learning rate, step count and buffers.

    Args:
        params: a layer/network (all of its ``parameters()``) or an iterable of ``ParamRef``.
        lr: learning rate. A schedule overwrites ``self.lr`` before each ``step()``;
            ``self.initial_lr`` keeps the base rate schedules start from.
    """

    name = ""
    buffer_names: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}

    def __init__(self, params: Layer | Iterable[ParamRef], lr: float | None = None, **hyper):
        refs = list(params.parameters() if isinstance(params, Layer) else params)
        if not refs:
            raise ConfigError(f"{type(self).__name__} got no parameters: is the network built?")
        names = [r.name for r in refs]
        if len(set(names)) != len(names):
            raise ConfigError("parameter names are not unique; optimizer state cannot be keyed")
        self.params = refs
        # entries that hold one array (a tied embedding and output head) are one parameter, as
        # in PyTorch: the first entry keeps its state, and the others follow its value
        first: dict[int, ParamRef] = {}
        self._tied: dict[str, list[ParamRef]] = {}
        for r in refs:
            owner = first.setdefault(id(r.value), r)
            if owner is not r:
                self._tied.setdefault(owner.name, []).append(r)
        self._distinct = list(first.values())
        self.backend = refs[0].layer.backend
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise ConfigError(f"{type(self).__name__} got unknown options {sorted(unknown)}; "
                              f"known: lr, {', '.join(self.defaults)}")
        self.hyper = {**self.defaults, **hyper}
        self.lr = float(self.default_lr if lr is None else lr)
        self.initial_lr = self.lr
        if self.lr < 0:
            raise ConfigError(f"learning rate must be non-negative, got {self.lr}")
        self._check_hyper()
        self.step_count = 0
        self.state: dict[str, dict[str, Array]] = {r.name: {} for r in self._distinct}

    default_lr = 1e-3

    def _follow_parameters(self) -> None:
        """Move the state to the backend the parameters are on now (the network moved with
        ``Layer.to`` after this optimizer was built), each buffer in its parameter's dtype."""
        old, new = self.backend, self._distinct[0].layer.backend
        for r in self._distinct:
            state = self.state[r.name]
            for k, v in list(state.items()):
                if old.is_array(v):
                    state[k] = new.from_host(old.to_host(v), dtype=r.value.dtype)
        self.backend = new

    def _check_hyper(self) -> None:
        """Subclasses validate ``self.hyper`` here."""

    # ------------------------------------------------------------------ stepping
    def zero_grad(self) -> None:
        """Set every parameter gradient to zeros (grads add up across backward calls)."""
        for r in self.params:
            r.zero_grad()

    def step(self) -> None:
        """Apply one update to every parameter from its accumulated gradient.

        An array that several layers hold (a tied embedding and output head) is one
        parameter, as in PyTorch: it is updated once, from the sum of its entries'
        gradients, and every entry then holds the result (also where the update makes a new
        array), so the tie lasts.

        Where the backend has a multi-tensor kernel for this optimizer (``_many_kernel``),
        every parameter whose gradient has its dtype is updated in place by one call (one or
        a few launches on a GPU instead of one per parameter). The others, and every
        parameter elsewhere, go through ``_update`` one by one (it promotes mixed dtypes as
        the reference does).

        If the network moved to another backend or dtype (``Layer.to``) since the last step,
        the optimizer's state follows it first."""
        if self._distinct[0].layer.backend is not self.backend:
            self._follow_parameters()
        self.step_count += 1
        grads = [self._grad(r) for r in self._distinct]
        many = self._many_kernel()
        together = ([i for i, (r, g) in enumerate(zip(self._distinct, grads))
                     if g.dtype == r.value.dtype] if many is not None else [])
        if together:
            self._update_many(many, [self._distinct[i] for i in together],
                              [grads[i] for i in together])
        done = set(together)
        for i, (r, g) in enumerate(zip(self._distinct, grads)):
            if i not in done:
                r.value = self._update(r.value, g, self.state[r.name])
        for r in self._distinct:
            for other in self._tied.get(r.name, ()):
                other.value = r.value

    def _grad(self, r: ParamRef) -> Array:
        """The gradient of parameter ``r``: summed over the entries tied to it."""
        g = r.grad
        for other in self._tied.get(r.name, ()):
            g = g + other.grad
        return g


    def _update(self, w: Array, g: Array, state: dict[str, Array]) -> Array:
        raise NotImplementedError

    def _many_kernel(self) -> Any:
        """The backend's multi-tensor kernel for the current settings, or ``None``."""
        return None

    def _update_many(self, many: Any, refs: list[ParamRef], grads: list[Array]) -> None:
        """Update ``refs`` in place from ``grads`` through ``many`` (see :meth:`step`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"type", "lr", "hyper", "step", "buffers": {param: {buffer: host array}}}``."""
        to_host = self.backend.to_host
        return {"type": self.name, "lr": self.lr, "hyper": dict(self.hyper),
                "step": self.step_count,
                "buffers": {name: {k: to_host(v) for k, v in bufs.items()}
                            for name, bufs in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (buffers go back to this optimizer's device)."""
        if state.get("type") != self.name:
            raise FormatError(f"optimizer state is for {state.get('type')!r}, "
                              f"but this optimizer is {self.name!r}")
        buffers = state.get("buffers", {})
        missing = set(self.state) - set(buffers)
        extra = set(buffers) - set(self.state)
        if missing or extra:
            raise FormatError("optimizer state does not match the parameters: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        by_name = {r.name: r for r in self.params}
        new_state: dict[str, dict[str, Array]] = {}
        for name, bufs in buffers.items():
            ref = by_name[name]
            new_state[name] = {}
            for k, host in bufs.items():
                if tuple(host.shape) != tuple(ref.value.shape):
                    raise FormatError(f"optimizer buffer {name}.{k} has shape "
                                      f"{list(host.shape)}, parameter has "
                                      f"{list(ref.value.shape)}")
                # an array of its own: in-place kernels (adam_update) write into the buffers,
                # and on the CPU (numpy, PyTorch) from_host may share the host array, which
                # is read-only when memory-mapped
                new_state[name][k] = self.backend.xp.asarray(
                    self.backend.from_host(host, dtype=ref.value.dtype), copy=True)
        self.state = new_state
        self.hyper = {**self.defaults, **state.get("hyper", {})}
        self.lr = float(state.get("lr", self.lr))
        self.step_count = int(state.get("step", 0))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        return f"{type(self).__name__}(lr={self.lr}, {opts})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov, weight decay
    (``torch.optim.SGD`` semantics: the momentum buffer starts as the first gradient)."""

    name = "sgd"
    default_lr = 1e-2
    defaults = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}

    def _check_hyper(self) -> None:
        h = self.hyper
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ConfigError("Nesterov momentum needs momentum > 0 and dampening = 0")

    def _many_kernel(self) -> Any:
        # plain SGD only (momentum buffers stay on the per-parameter path)
        return None if self.hyper["momentum"] else self.backend.kernel("sgd_update_many")

    def _update_many(self, many: Any, refs: list[ParamRef], grads: list[Array]) -> None:
        many([r.value for r in refs], grads, lr=self.lr, weight_decay=self.hyper["weight_decay"])

    def _update(self, w, g, state):
        h = self.hyper
        mu = h["momentum"]
        # plain SGD through the backend's kernel where it has one (in place, one pass)
        fused = None if mu or g.dtype != w.dtype else self.backend.kernel("sgd_update")
        if fused is not None:
            return fused(w, g, lr=self.lr, weight_decay=h["weight_decay"])
        if h["weight_decay"]:
            g = g + h["weight_decay"] * w
        if mu:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else mu * buf + (1.0 - h["dampening"]) * g
            state["momentum_buffer"] = buf
            g = g + mu * buf if h["nesterov"] else buf
        return w - self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2-style ``weight_decay`` and optional AMSGrad
    (``torch.optim.Adam`` semantics)."""

    name = "adam"
    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                "amsgrad": False}
    decoupled = False

    def _check_hyper(self) -> None:
        for k in ("beta1", "beta2"):
            if not 0.0 <= self.hyper[k] < 1.0:
                raise ConfigError(f"{k} must be in [0, 1), got {self.hyper[k]}")

    def _many_kernel(self) -> Any:
        return None if self.hyper["amsgrad"] else self.backend.kernel("adam_update_many")

    def _update_many(self, many: Any, refs: list[ParamRef], grads: list[Array]) -> None:
        states = [self.state[r.name] for r in refs]
        for r, state in zip(refs, states):
            for key in ("exp_avg", "exp_avg_sq"):
                if state.get(key) is None:
                    state[key] = self.backend.xp.zeros_like(r.value)
        h = self.hyper
        many([r.value for r in refs], grads,
             [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], lr=self.lr,
             beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], weight_decay=h["weight_decay"],
             step=self.step_count, decoupled=self.decoupled)

    def _update(self, w, g, state):
        h = self.hyper
        xp = self.backend.xp
        b1, b2, wd = h["beta1"], h["beta2"], h["weight_decay"]
        # the fused kernels update in place in w's dtype; a mixed-dtype gradient (bfloat16
        # weights, float32 gradients) takes the reference path, which promotes
        fused = (None if h["amsgrad"] or g.dtype != w.dtype
                 else self.backend.kernel("adam_update"))
        if fused is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                if state.get(key) is None:
                    state[key] = xp.zeros_like(w)
            return fused(w, g, state["exp_avg"], state["exp_avg_sq"], lr=self.lr, beta1=b1,
                         beta2=b2, eps=h["eps"], weight_decay=wd, step=self.step_count,
                         decoupled=self.decoupled)
        if wd and self.decoupled:
            w = w * (1.0 - self.lr * wd)
        elif wd:
            g = g + wd * w
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = (1.0 - b1) * g if m is None else b1 * m + (1.0 - b1) * g
        v = (1.0 - b2) * (g * g) if v is None else b2 * v + (1.0 - b2) * (g * g)
        state["exp_avg"], state["exp_avg_sq"] = m, v
        if h["amsgrad"]:
            vmax = state.get("max_exp_avg_sq")
            vmax = v if vmax is None else xp.maximum(vmax, v)
            state["max_exp_avg_sq"] = vmax
            v = vmax
        t = self.step_count
        step_size = self.lr / (1.0 - b1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - b2 ** t) + h["eps"]
        return w - step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: ``w ← w(1 - η·λ)`` before the Adam step
    (``torch.optim.AdamW`` semantics, default λ = 0.01)."""

    name = "adamw"
    defaults = {**Adam.defaults, "weight_decay": 0.01}
    decoupled = True


class RMSprop(Optimizer):
    """RMSprop (``torch.optim.RMSprop`` semantics: ε outside the square root; Loom puts it
    inside). Options: ``alpha``, ``eps``, ``momentum``, ``centered``, ``weight_decay``."""

    name = "rmsprop"
    default_lr = 1e-2
    defaults = {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False,
                "weight_decay": 0.0}

    def _update(self, w, g, state):
        h = self.hyper
        xp = self.backend.xp
        a = h["alpha"]
        if h["weight_decay"]:
            g = g + h["weight_decay"] * w
        sq = state.get("square_avg")
        sq = (1.0 - a) * (g * g) if sq is None else a * sq + (1.0 - a) * (g * g)
        state["square_avg"] = sq
        if h["centered"]:
            ga = state.get("grad_avg")
            ga = (1.0 - a) * g if ga is None else a * ga + (1.0 - a) * g
            state["grad_avg"] = ga
            denom = xp.sqrt(sq - ga * ga) + h["eps"]
        else:
            denom = xp.sqrt(sq) + h["eps"]
        if h["momentum"]:
            buf = state.get("momentum_buffer")
            buf = g / denom if buf is None else h["momentum"] * buf + g / denom
            state["momentum_buffer"] = buf
            return w - self.lr * buf
        return w - self.lr * (g / denom)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW,
                                          "rmsprop": RMSprop}


def get_optimizer(optimizer: str | Optimizer, params: Layer | Iterable[ParamRef],
                  lr: float | None = None, **options) -> Optimizer:
    """An optimizer by name (``sgd``, ``sgd_momentum``, ``nesterov``, ``adam``, ``adamw``,
    ``rmsprop``) over ``params``, or the given instance (its ``lr`` replaced when given).

    Raises:
        ConfigError: an instance together with ``options`` (set them when building it), or an
            instance holding a parameter that is not one of ``params`` (built on another
            network: it would train nothing here).
    """
    if isinstance(optimizer, Optimizer):
        if options:
            raise ConfigError(f"optimizer options {sorted(options)} cannot be applied to an "
                              f"optimizer instance ({type(optimizer).__name__}); pass them "
                              "when building it")
        refs = params.parameters() if isinstance(params, Layer) else params
        own = {(id(r.layer), r.key) for r in refs}
        foreign = [r.name for r in optimizer.params if (id(r.layer), r.key) not in own]
        if foreign:
            raise ConfigError(f"the {type(optimizer).__name__} instance holds parameters that "
                              f"are not this network's (e.g. {foreign[:3]}): build it on the "
                              "network being trained")
        if lr is not None:
            optimizer.lr = optimizer.initial_lr = float(lr)
        return optimizer
    key = str(optimizer).lower()
    if key == "sgd_momentum":
        key, options = "sgd", {"momentum": 0.9, **options}
    elif key == "nesterov":
        key, options = "sgd", {"momentum": 0.9, "nesterov": True, **options}
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: sgd, sgd_momentum, "
                          "nesterov, adam, adamw, rmsprop")
    return OPTIMIZERS[key](params, lr=lr, **options)
