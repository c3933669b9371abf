"""The layer protocol shared by every loomx layer.

A layer is a small object with

- a **config**: plain JSON-serialisable fields, listed in ``config_fields``; ``get_config()``
  returns them with ``"type"`` (the registry name) and ``layer_from_config`` rebuilds the layer;
- a **parameter registry**: ``params`` and ``grads``, dicts of name → backend array with the
  same keys and shapes; ``parameters()`` walks nested layers (``children()``) too;
- ``build(input_shape, backend, rng)``: creates parameters for a per-sample input shape (no batch
  axis) and returns the per-sample output shape;
- ``forward(x, train) -> (y, ctx)``: ``x`` has a leading batch axis; ``ctx`` is whatever
  ``backward`` needs (kept by the caller, so several forwards can be in flight, as in the
  stepping executor);
- ``backward(dy, ctx) -> dx``: returns the input gradient and **adds** every parameter gradient
  into ``grads`` (so gradient accumulation is a matter of not calling ``zero_grad``). A layer
  that can save work when nobody reads ``dx`` accepts the keyword ``need_input_grad=True``
  and, when it is ``False``, only accumulates ``grads`` and returns ``None``; callers go
  through :func:`call_backward`, which passes the keyword only to layers that accept it.

Layers never check which backend they run on: they use ``self.xp`` (the array-API namespace)
and ``self.backend`` for the few non-standard operations.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Iterator
from typing import Any, ClassVar

from ..backends import Backend, RandomSource, get_backend
from ..errors import ConfigError, LoomxError, ShapeError

Array = Any
Shape = tuple[int, ...]

LAYER_TYPES: dict[str, type[Layer]] = {}

#: the names a layer's ``dtype=`` may take (a backend may lack some, e.g. numpy bfloat16)
FLOAT_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (not a bool, not a float), else ``None``.

    Python ints and integer scalars of any array library that supports ``operator.index``
    (numpy's ``int64``, say) are integers; ``3.0``, ``"3"`` and ``True`` are not.
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def config_int(value: Any, what: str, owner: str, minimum: int | None = 1,
               optional: bool = False) -> int | None:
    """Check an integer constructor argument and return it as a Python int.

    Raises :class:`ConfigError` unless ``value`` is an integer (see :func:`as_int`) of at least
    ``minimum`` (no bound when ``minimum`` is ``None``); ``None`` passes through when
    ``optional``.
    """
    if value is None and optional:
        return None
    n = as_int(value)
    if n is None:
        raise ConfigError(f"{owner} {what} must be an integer, got {value!r}")
    if minimum is not None and n < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{owner} {what} must be {bound}, got {n}")
    return n


def config_float(value: Any, what: str, owner: str) -> float:
    """A real-number constructor argument as a Python float (``ConfigError`` for strings,
    bools, ``None``, complex numbers and NaN)."""
    if isinstance(value, (bool, str)) or value is None:
        raise ConfigError(f"{owner} {what} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner} {what} must be a real number, got {value!r}") from None
    if out != out:
        raise ConfigError(f"{owner} {what} must be a real number, got NaN")
    return out


def as_shape(shape: Any, owner: str) -> tuple[int, ...]:
    """A per-sample shape as a tuple of positive Python ints; a bare int ``n`` is ``(n,)``.

    Raises :class:`ShapeError` for anything else (non-integers, zero or negative sizes).
    """
    single = as_int(shape)
    if single is not None:
        dims: Any = (single,)
    else:
        try:
            dims = tuple(shape)
        except TypeError:
            raise ShapeError(f"{owner} expected a per-sample input shape (a tuple of positive "
                             f"ints, e.g. (784,)) but received {shape!r}") from None
    out = tuple(as_int(d) for d in dims)
    if any(d is None or d < 1 for d in out):
        raise ShapeError(f"{owner} expected a per-sample input shape of positive ints (no "
                         f"batch axis) but received {list(dims)!r}")
    return out  # type: ignore[return-value]


_REAL_FLOAT: dict[tuple[type, Any], bool] = {}


def is_real_float(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype (cached per dtype: no array work)."""
    # keyed with the dtype's type first, so dtypes of different libraries never compare
    key = (type(dtype), dtype)
    try:
        return _REAL_FLOAT[key]
    except (KeyError, TypeError):
        pass
    try:
        ok = bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        ok = False
    try:
        _REAL_FLOAT[key] = ok
    except TypeError:  # an unhashable dtype: not cached
        pass
    return ok


def walk_layers(layer: Layer) -> Iterator[Layer]:
    """``layer`` and every nested layer, depth first, each object once (a layer held in two
    slots is visited at its first)."""
    seen: set[int] = set()

    def visit(node: Layer) -> Iterator[Layer]:
        if id(node) in seen:
            return
        seen.add(id(node))
        yield node
        for _, child in node.children():
            yield from visit(child)

    yield from visit(layer)


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make ``cls`` constructible by ``layer_from_config``."""
    if not cls.type_name:
        raise ConfigError(f"{cls.__name__} needs a type_name to be registered")
    LAYER_TYPES[cls.type_name] = cls
    for alias in cls.aliases:
        LAYER_TYPES[alias] = cls
    return cls


def layer_from_config(config: dict) -> Layer:
    """Build an (unbuilt) layer from ``get_config()`` output."""
    config = dict(config)
    type_name = config.pop("type", None)
    if type_name not in LAYER_TYPES:
        raise ConfigError(
            f"unknown layer type {type_name!r}; known: {', '.join(sorted(LAYER_TYPES))}")
    return LAYER_TYPES[type_name].from_config(config)


_ACCEPTS_FLAG: dict[Any, bool] = {}


def accepts_need_input_grad(layer: Layer) -> bool:
    """Whether ``layer.backward`` takes the ``need_input_grad`` keyword (cached per function)."""
    fn = layer.backward
    key = getattr(fn, "__func__", fn)
    ok = _ACCEPTS_FLAG.get(key)
    if ok is None:
        try:
            ok = "need_input_grad" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            ok = False
        _ACCEPTS_FLAG[key] = ok
    return ok


def call_backward(layer: Layer, dy: Array, ctx: Any, need_input_grad: bool = True) -> Any:
    """``layer.backward(dy, ctx)``; with ``need_input_grad=False`` returns ``None`` and lets
    layers that accept the keyword skip their input gradient (others run in full)."""
    if need_input_grad:
        return layer.backward(dy, ctx)
    if accepts_need_input_grad(layer):
        layer.backward(dy, ctx, need_input_grad=False)
    else:
        layer.backward(dy, ctx)
    return None


def has_parameters(layer: Layer) -> bool:
    """Whether ``layer`` or a nested layer has at least one parameter."""
    return next(iter(layer.parameters()), None) is not None


class ParamRef:
    """A handle on one parameter: ``layer.params[key]`` and ``layer.grads[key]``.

    Optimizers read and write through it, so they reach every parameter of every layer,
    nested branches included, and may replace arrays functionally.
    """

    __slots__ = ("name", "layer", "key")

    def __init__(self, name: str, layer: Layer, key: str):
        self.name, self.layer, self.key = name, layer, key

    def __repr__(self) -> str:
        return f"ParamRef({self.name!r}, shape={tuple(self.value.shape)})"

    @property
    def value(self) -> Array:
        return self.layer.params[self.key]

    @value.setter
    def value(self, v: Array) -> None:
        self.layer.params[self.key] = v

    @property
    def grad(self) -> Array:
        return self.layer.grads[self.key]

    @grad.setter
    def grad(self, g: Array) -> None:
        self.layer.grads[self.key] = g

    def zero_grad(self) -> None:
        """Set the gradient to zeros (see :meth:`Layer.zero_grad_of`)."""
        self.layer.zero_grad_of(self.key)


class Layer:
    """Base class of all layers (see the module docstring for the protocol)."""

    type_name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    config_fields: ClassVar[tuple[str, ...]] = ()

    #: whether :meth:`check_input` requires a real floating input (layers that compute on
    #: values); shape-only layers (Flatten, Reshape) and containers accept any dtype.
    #: :meth:`check_last_axis` and :meth:`check_sequence` always require one.
    float_input: ClassVar[bool] = False
    #: whether the layer's input is integer ids (an Embedding): ``fit`` and ``evaluate`` then
    #: hand integer data over as it is, where they cast integer features to float otherwise
    takes_ids: ClassVar[bool] = False

    def __init__(self, *, name: str | None = None, dtype: str | None = None):
        if dtype is not None and dtype not in FLOAT_DTYPE_NAMES:
            raise ConfigError(f"{type(self).__name__} dtype must be a floating dtype name "
                              f"({', '.join(FLOAT_DTYPE_NAMES)}) or None, got {dtype!r}")
        self.name = name
        self.dtype = dtype
        self.backend: Backend | None = None
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        # the zeros zero_grad put in ``grads``: the first gradient replaces them (no add pass)
        self._zero_grads: dict[str, Array] = {}
        self.input_shape: Shape | None = None
        self.output_shape: Shape | None = None
        self.disabled = False

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        """Plain-dict config: ``{"type": ..., <config fields>, "name"?, "dtype"?}``."""
        cfg: dict[str, Any] = {"type": self.type_name}
        for f in self.config_fields:
            v = getattr(self, f)
            cfg[f] = list(v) if isinstance(v, tuple) else v
        if self.name is not None:
            cfg["name"] = self.name
        if self.dtype is not None:
            cfg["dtype"] = self.dtype
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        """Inverse of :meth:`get_config` (without the ``type`` key)."""
        try:
            return cls(**config)
        except TypeError as exc:
            raise ConfigError(f"bad config for layer {cls.type_name!r}: {exc}") from exc

    # ------------------------------------------------------------------ building
    @property
    def xp(self) -> Any:
        """The array-API namespace of this layer's backend."""
        if self.backend is None:
            raise self._not_built()
        return self.backend.xp

    @property
    def built(self) -> bool:
        return self.output_shape is not None

    def child_backend(self) -> Backend:
        """The backend a container builds its nested layers on: its own, carrying its
        ``dtype`` when it has one (so a ``Network(..., dtype="float64")``'s layers default to
        float64; a nested layer's own ``dtype`` still wins)."""
        return get_backend(self.backend, self.dtype) if self.dtype else self.backend

    @property
    def float_dtype(self) -> Any:
        """The dtype of this layer's parameters and activations."""
        if not self.dtype:
            return self.backend.float_dtype
        dt = getattr(self.xp, self.dtype, None)
        if dt is None:
            raise ConfigError(f"{self.describe()} dtype {self.dtype!r} is not available on "
                              f"backend {self.backend.name}")
        return dt

    def build(self, input_shape: Shape, backend: Backend | str | None = None,
              rng: RandomSource | int | None = None) -> Shape:
        """Create parameters for per-sample ``input_shape``; return the per-sample output shape.

        Args:
            input_shape: shape of one sample (no batch axis), e.g. ``(784,)`` or ``(3, 32, 32)``;
                positive ints; a bare int ``n`` means ``(n,)``.
            backend: backend or spec; default: the current backend.
            rng: a ``RandomSource`` or an int seed for initialisation (default seed 0).

        Raises:
            ShapeError: ``input_shape`` is not a tuple of positive ints, or does not fit.
        """
        input_shape = as_shape(input_shape, self.describe())
        self.backend = get_backend(backend)
        if rng is None or isinstance(rng, int):
            rng = self.backend.random(0 if rng is None else rng)
        with self.backend.activate():
            out = self._build(input_shape, rng)
        self.input_shape = input_shape
        self.output_shape = tuple(int(d) for d in out)
        self.zero_grad()
        return self.output_shape

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        """Subclasses create ``self.params`` here and return the output shape."""
        return input_shape

    # ------------------------------------------------------------------ running
    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        """``x [B, *input_shape]`` → ``(y [B, *output_shape], ctx)``."""
        raise NotImplementedError

    def backward(self, dy: Array, ctx: Any, need_input_grad: bool = True) -> Array | None:
        """``dy [B, *output_shape]`` → ``dx [B, *input_shape]``; adds into ``grads``.

        Subclasses may omit ``need_input_grad`` (see :func:`call_backward`); those that take
        it return ``None`` without computing ``dx`` when it is ``False``.
        """
        raise NotImplementedError

    def __call__(self, x: Array, train: bool = False) -> Array:
        return self.forward(x, train)[0]

    def zero_grad(self) -> None:
        """Set every gradient (of this layer and nested ones) to zeros."""
        for k in self.params:
            self.zero_grad_of(k)
        for _, child in self.children():
            child.zero_grad()

    def zero_grad_of(self, key: str) -> None:
        """Set ``grads[key]`` to zeros of the parameter's shape and dtype
        (:meth:`Backend.grad_zeros`: possibly read-only; :meth:`_accumulate` replaces it)."""
        zeros = self.backend.grad_zeros(self.params[key])
        self.grads[key] = zeros
        self._zero_grads[key] = zeros

    def _accumulate(self, key: str, g: Array) -> None:
        """Add ``g`` into ``grads[key]`` (functional update; works on every backend).

        Right after :meth:`zero_grad` the gradient *is* ``g``: it replaces the zeros instead of
        being added to them, which saves a pass over every parameter (and the first touch of
        the zeros' pages). ``g`` is kept, not copied; layers pass freshly computed arrays.
        """
        current = self.grads[key]
        if self._zero_grads.pop(key, None) is current:
            self.grads[key] = g
        else:
            self.grads[key] = current + g

    # ------------------------------------------------------------------ structure
    def children(self) -> list[tuple[str, Layer]]:
        """Nested layers as ``(name, layer)`` (containers override this)."""
        return []

    def parameters(self, prefix: str = "") -> Iterator[ParamRef]:
        """Every parameter of this layer and its children, depth first."""
        for key in self.params:
            yield ParamRef(f"{prefix}{key}", self, key)
        for cname, child in self.children():
            yield from child.parameters(f"{prefix}{cname}.")

    def param_count(self) -> int:
        """Total number of scalar parameters (nested included)."""
        return sum(math.prod(p.value.shape) for p in self.parameters())

    def to(self, backend: Backend | str, dtype: str | None = None) -> Layer:
        """Move parameters (and nested layers) to another backend and/or dtype, in place.

        Without ``dtype``, float parameters take the new backend's float dtype, except in
        layers built with their own ``dtype=`` (a float64 norm in a float32 network, say),
        which keep it, and layers inside a container with a ``dtype``, which take the
        container's. With ``dtype``, every float parameter of this layer and of every nested
        layer takes it, and those layers' own dtypes are dropped.
        """
        new = get_backend(backend, dtype)
        if dtype is None:  # every own dtype must exist on the new backend: check before moving
            for layer in walk_layers(self):
                if layer.dtype and getattr(new.xp, layer.dtype, None) is None:
                    raise ConfigError(f"{layer.describe()} has dtype {layer.dtype!r}, which "
                                      f"backend {new.name} does not have; move with an "
                                      "explicit dtype (net.to(backend, 'float32'))")
        old = self.backend
        if dtype is not None:
            self.dtype = None
        self.backend = new
        if old is not None:
            floats = self.float_dtype  # this layer's own dtype on the new backend, if it has one
            for k, v in list(self.params.items()):
                host = old.to_host(v)
                self.params[k] = new.from_host(host, dtype=floats if host.dtype.kind in "fV"
                                               else getattr(new.xp, str(host.dtype)))
        for _, child in self.children():
            child.to(self.child_backend(), dtype)
        if self.built:
            self.zero_grad()
        return self

    # ------------------------------------------------------------------ checks
    def describe(self) -> str:
        """``"Dense 'fc1'"``-style label used in error messages."""
        label = type(self).__name__
        return f"{label} {self.name!r}" if self.name else label

    def _not_built(self) -> LoomxError:
        return LoomxError(f"{self.describe()} is not built yet: call build(input_shape)")

    def _not_array(self, x: Any) -> ShapeError:
        library = self.backend.name if self.backend is not None else "the backend's"
        return ShapeError(f"{self.describe()} expected a {library} array but received a "
                          f"{type(x).__name__}; convert it with backend.from_host(...) or "
                          "backend.asarray(...)")

    def _check_float(self, x: Array) -> None:
        """Raise :class:`ShapeError` unless ``x`` has a real floating dtype (metadata only)."""
        if not is_real_float(self.backend.xp, x.dtype):
            if not self.backend.is_array(x):
                raise self._not_array(x)
            raise ShapeError(f"{self.describe()} expected a real floating input (float16, "
                             f"float32, float64, ...) but received dtype {x.dtype}; convert "
                             "it with xp.astype(x, xp.float32)")

    def check_input(self, x: Array) -> None:
        """Raise :class:`ShapeError` unless ``x`` is ``[B, *input_shape]`` (and, for layers
        with ``float_input``, of a real floating dtype)."""
        if self.input_shape is None:
            raise self._not_built()
        try:
            got = tuple(x.shape)
        except AttributeError:
            raise self._not_array(x) from None
        if got[1:] != self.input_shape:
            raise ShapeError(
                f"{self.describe()} expected input of shape [B, "
                f"{', '.join(map(str, self.input_shape))}] but received {list(got)}")
        if self.float_input:
            self._check_float(x)

    def check_grad(self, dy: Array, shape: tuple[int, ...]) -> None:
        """Raise :class:`ShapeError` unless ``dy`` (given to ``backward``) has ``shape``, the
        shape of the forward output (a tuple comparison: no array work, no sync)."""
        try:
            got = dy.shape
        except AttributeError:
            raise self._not_array(dy) from None
        if got != shape:
            raise ShapeError(f"{self.describe()} backward expected dy of shape {list(shape)} "
                             f"(the shape of the forward output) but received {list(got)}")

    def last_axis_size(self, input_shape: Shape) -> int:
        """At build, for layers acting on the last axis: its size (``ShapeError`` for ``[]``)."""
        if not input_shape:
            raise ShapeError(f"{self.describe()} acts on the last axis and needs at least one "
                             "input axis; received a per-sample shape []")
        return input_shape[-1]

    def check_last_axis(self, x: Array, features: int | None) -> None:
        """For layers acting on the last axis: raise unless ``x`` is ``[B, ..., features]`` of
        a real floating dtype."""
        if not self.built:
            raise self._not_built()
        try:
            shape = x.shape
        except AttributeError:
            raise self._not_array(x) from None
        if len(shape) < 2 or shape[-1] != features:
            raise ShapeError(f"{self.describe()} expected input [B, ..., {features}] "
                             f"but received {list(shape)}")
        self._check_float(x)

    def check_sequence(self, x: Array, features: int | None) -> None:
        """For sequence layers: raise unless ``x`` is ``[B, T, features]`` with ``T ≥ 1``, of a
        real floating dtype."""
        if not self.built:
            raise self._not_built()
        try:
            shape = x.shape
        except AttributeError:
            raise self._not_array(x) from None
        if len(shape) != 3 or shape[-1] != features or shape[1] < 1:
            raise ShapeError(f"{self.describe()} expected input [B, T, {features}] (T ≥ 1) "
                             f"but received {list(shape)}")
        self._check_float(x)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.config_fields)
        return f"{type(self).__name__}({fields})"
