"""Save and load networks in the loomx format (one ``.safetensors`` file, config in metadata).

``save(net, path)`` writes every parameter (named as ``net.parameters()`` names them, e.g.
``"3.weight"`` or ``"0.branch1.2.bias"``) in its own dtype, with ``net.get_config()`` as JSON
in the file's metadata, atomically. ``load(path, backend=None)`` rebuilds the network from the
config, checks every tensor against what the config implies (names, shapes, dtypes) and only
then copies the weights in: a file that does not match raises :class:`~loomx.errors.FormatError`
naming the tensors at fault, and no half-loaded network is ever returned. Values round-trip
bit-exactly.
"""

from __future__ import annotations

import os

from ..backends import Backend, get_backend
from ..errors import ConfigError, FormatError, LoomxError
from ..io.loomx_format import read_loomx, write_loomx
from ..layers.base import Layer, layer_from_config
from .network import Network


def save(net: Layer, path: str | os.PathLike) -> None:
    """Write ``net`` (a built :class:`Network` or any built layer) to ``path`` atomically."""
    if not isinstance(net, Layer) or not net.built:
        raise LoomxError("only a built network (or layer) can be saved: call "
                         "build(input_shape) first")
    config = net.get_config()
    config["input_shape"] = list(net.input_shape)
    b = net.backend
    tensors = {}
    for p in net.parameters():
        if p.name in tensors:
            raise LoomxError(f"two parameters share the name {p.name!r}; cannot save")
        tensors[p.name] = b.to_host(p.value)
    dtype = b.dtype_name(b.float_dtype)
    write_loomx(path, tensors, {"network": config, "float_dtype": dtype})


def _rebuild(config: dict, backend: Backend) -> Layer:
    net_cfg = dict(config)
    input_shape = net_cfg.pop("input_shape", None)
    if input_shape is None:
        raise ConfigError("the saved config has no input_shape")
    layer = (Network.from_config({k: v for k, v in net_cfg.items() if k != "type"})
             if net_cfg.get("type") == "network" else layer_from_config(net_cfg))
    layer.build(tuple(input_shape), backend, 0)
    return layer


def load(path: str | os.PathLike, backend: Backend | str | None = None) -> Layer:
    """Read a network saved by :func:`save`; parameters land on ``backend``.

    The default float dtype of the backend is the one the network was saved with unless
    ``backend`` is a :class:`Backend` object (whose dtype is used as is).
    """
    path = os.fspath(path)
    tensors, meta = read_loomx(path)
    if not isinstance(meta, dict) or "network" not in meta:
        raise FormatError(f"{path}: the loomx metadata has no 'network' config")
    if isinstance(backend, Backend):
        target = backend
    else:
        target = get_backend(backend, meta.get("float_dtype"))
    try:
        net = _rebuild(meta["network"], target)
    except LoomxError as exc:
        raise FormatError(f"{path}: the stored config does not build a network: {exc}") from exc
    refs = {p.name: p for p in net.parameters()}
    missing = sorted(set(refs) - set(tensors))
    extra = sorted(set(tensors) - set(refs))
    wrong = []
    for name, ref in refs.items():
        if name not in tensors:
            continue
        have, want_shape = tensors[name], tuple(ref.value.shape)
        if tuple(have.shape) != want_shape:
            wrong.append(f"{name}: shape {list(have.shape)}, config implies {list(want_shape)}")
        elif (have.dtype.kind in "fV") != (target.dtype_name(ref.value.dtype).startswith(
                ("float", "bfloat"))):
            wrong.append(f"{name}: dtype {have.dtype}, expected "
                         f"{target.dtype_name(ref.value.dtype)}")
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if extra:
            parts.append(f"unexpected tensors {extra}")
        parts.extend(wrong)
        raise FormatError(f"{path}: weights do not match the stored config: "
                          + "; ".join(parts))
    values = {name: target.from_host(tensors[name].copy(), dtype=ref.value.dtype)
              for name, ref in refs.items()}
    for name, ref in refs.items():
        ref.value = values[name]
    net.zero_grad()
    return net
