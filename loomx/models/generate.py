"""Text generation: greedy and sampled decoding with a KV cache, stop tokens and streaming.

The prompt runs through the model once (filling one KV cache per block); each new token then
costs one single-position forward pass. Choosing the next token needs the last logits on the
host, one declared device→host copy per token; the choice itself (temperature, top-k, top-p,
seeded draw) runs on the host through the numpy backend's array namespace.

Sampling, given logits ``z`` of the last position:

- ``temperature == 0`` (default): greedy, ``argmax z``;
- otherwise ``p = softmax(z / temperature)``, restricted to the ``top_k`` largest entries and
  then to the smallest set of most likely tokens whose probability reaches ``top_p`` (always at
  least one), renormalised, and drawn with a seeded generator (``seed`` makes it repeatable).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import get_backend
from ..errors import ConfigError, FormatError
from .build import TransformerModel


def load_tokenizer(source: Any):
    """A ``tokenizers.Tokenizer`` for a model, a sniff report, a ``tokenizer.json`` or a folder.

    Looks for ``tokenizer.json`` next to the weights, else builds one from a GGUF vocabulary.
    Padding configured in the file is switched off (``encode`` returns the real tokens only;
    pad batches yourself and pass an attention mask); truncation is kept.
    """
    from tokenizers import Tokenizer

    report = getattr(source, "report", source)
    path = None
    if isinstance(source, (str, Path)):
        p = Path(source)
        path = p if p.suffix == ".json" else (p if p.is_dir() else p.parent) / "tokenizer.json"
        if not path.is_file() and p.suffix == ".gguf":
            from ..io.gguf import GGUFFile

            return GGUFFile(p).tokenizer()
    elif getattr(report, "tokenizer", None):
        path = Path(report.tokenizer)
    elif getattr(report, "format", None) == "gguf":
        return report.source.tokenizer()
    if path is None or not path.is_file():
        raise FormatError(f"no tokenizer.json found for {getattr(report, 'path', source)}; "
                          "pass token ids, or put the model's tokenizer.json next to its weights")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise FormatError(f"{path}: not a valid tokenizer.json ({exc})") from None
    tok.no_padding()
    return tok


def _stop_ids(model: TransformerModel, stop: Sequence[int] | int | None) -> set[int]:
    if stop is None:
        eos = model.report.get("eos_token_id")
        stop = [] if eos is None else eos
    from ..layers.base import as_int

    if as_int(stop) is not None:  # one id (numpy integers included)
        stop = [stop]
    return {int(s) for s in stop}


def check_sampling(max_new_tokens: Any = 0, temperature: Any = 0.0, top_k: Any = None,
                   top_p: Any = None) -> None:
    """Raise :class:`ConfigError` for sampling settings outside their ranges: ``max_new_tokens``
    an int ≥ 0, ``temperature`` ≥ 0, ``top_k`` ``None`` or an int ≥ 1, ``top_p`` ``None`` or in
    ``(0, 1]``."""
    from ..layers.base import as_int

    def is_int(v):
        return as_int(v) is not None

    def number(v):  # a real number (numpy's too), not a bool: its float, else None
        if isinstance(v, bool):
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    t = number(temperature)
    if t is None or not t >= 0:
        raise ConfigError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    p = None if top_p is None else number(top_p)
    if top_p is not None and (p is None or not 0.0 < p <= 1.0):
        raise ConfigError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def choose_token(logits_host: Any, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, rng: Any = None) -> int:
    """Pick a token id from host logits ``[V]`` (see the module docstring for the rule)."""
    host = get_backend("numpy")
    xp = host.xp
    z = xp.astype(xp.asarray(logits_host), xp.float64)
    if not temperature:
        return int(xp.argmax(z))
    if temperature < 0:
        raise ConfigError(f"temperature must be ≥ 0, got {temperature}")
    z = z / temperature
    order = xp.argsort(-z, stable=True)
    zs = xp.take(z, order)
    if top_k is not None and top_k > 0:
        keep = min(int(top_k), zs.shape[0])
        order, zs = order[:keep], zs[:keep]
    p = xp.exp(zs - zs[0])
    p = p / xp.sum(p)
    if top_p is not None and 0.0 < top_p < 1.0:
        before = xp.cumulative_sum(p) - p
        n_keep = max(1, int(xp.sum(xp.astype(before < top_p, xp.int64))))
        order, p = order[:n_keep], p[:n_keep]
        p = p / xp.sum(p)
    rng = rng if rng is not None else host.random(None)
    u = float(rng.host_uniform((1,))[0])
    cdf = xp.cumulative_sum(p)
    idx = int(xp.sum(xp.astype(cdf <= u * float(cdf[-1]), xp.int64)))
    return int(order[min(idx, order.shape[0] - 1)])


def stream(model: TransformerModel, prompt_ids: Sequence[int], max_new_tokens: int = 32,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, stop: Sequence[int] | int | None = None,
           use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time.

    Args:
        model: a decoder from :func:`~loomx.models.load_model`.
        prompt_ids: the prompt as token ids (at least one).
        max_new_tokens: upper bound on yielded tokens.
        temperature, top_k, top_p, seed: sampling controls (``temperature=0``: greedy).
        stop: token ids that end generation (not yielded); default: the model's EOS ids.
        use_cache: decode with a KV cache (``False`` re-runs the whole sequence each step).
    """
    if model.kind != "decoder":
        raise ConfigError("generation needs a decoder; this model is an encoder")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ConfigError("generation needs a prompt of at least one token")
    stops = _stop_ids(model, stop)
    rng = get_backend("numpy").random(seed)
    total = len(prompt) + int(max_new_tokens)
    if model.report["positions"] == "learned":
        if len(prompt) > model.max_positions:
            raise ConfigError(f"the prompt has {len(prompt)} tokens but the model's learned "
                              f"position table has {model.max_positions}")
        # the last new token needs no forward pass of its own, so it may sit past the table
        total = min(total, model.max_positions + 1)
        cache_len = min(total, model.max_positions)
    else:
        cache_len = total
    cache = model.new_cache(1, cache_len) if use_cache else None
    seq = list(prompt)
    step_ids = prompt
    while len(seq) < total:
        logits = model(model.ids([step_ids if use_cache else seq]), cache)
        last = model.backend.to_host(logits[0, -1, :])
        tok = choose_token(last, temperature, top_k, top_p, rng)
        if tok in stops:
            return
        seq.append(tok)
        yield tok
        step_ids = [tok]


@dataclass
class Generation:
    """The result of :func:`generate`: new token ids and, with a tokenizer, their text."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None = None

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


def generate(model: TransformerModel, prompt: str | Sequence[int], max_new_tokens: int = 32,
             tokenizer: Any = None, **kw) -> Generation:
    """Generate from a text prompt (needs a tokenizer, found automatically) or token ids.

    Keyword arguments are those of :func:`stream`.
    """
    if isinstance(prompt, str):
        tokenizer = tokenizer or load_tokenizer(model)
        ids = tokenizer.encode(prompt).ids
    else:
        ids = [int(t) for t in prompt]
    new = list(stream(model, ids, max_new_tokens, **kw))
    text = tokenizer.decode(new) if tokenizer is not None else None
    return Generation(ids, new, text)


def stream_text(model: TransformerModel, prompt: str, max_new_tokens: int = 32,
                tokenizer: Any = None, **kw) -> Iterator[str]:
    """Yield decoded text pieces as tokens arrive (multi-byte characters are held back until
    complete)."""
    tokenizer = tokenizer or load_tokenizer(model)
    ids = tokenizer.encode(prompt).ids
    new: list[int] = []
    shown = ""
    for tok in stream(model, ids, max_new_tokens, **kw):
        new.append(tok)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
        else:
            shown = text
