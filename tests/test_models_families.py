"""Every family, built by the one generic assembly, against transformers on the same file.

Tiny random checkpoints are written offline by transformers (``tests/tiny_models.py``); loomx
must give the same logits (within 1e-4 in float32) with and without its KV cache, and the same
greedy continuations as ``transformers.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

import loomx
from loomx.errors import ConfigError
from loomx.models import stream

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import (  # noqa: E402
    FAMILIES,
    MOE_FAMILIES,
    VOCAB,
    cached_logits,
    check_cached_logits_on,
    reference_greedy,
    reference_logits,
    tiny_model,
)

DECODERS = [f for f in FAMILIES if f != "bert"] + list(MOE_FAMILIES)
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))


def _reference(family: str, variant: str = "f32", ids=IDS) -> np.ndarray:
    return reference_logits(family, ids, variant)


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_logits_match_transformers(family, loaded):
    model = loaded(family)
    y = model.backend.to_host(model(model.ids(IDS)))
    ref = _reference(family)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_gives_the_same_logits(family, loaded):
    model = loaded(family)
    np.testing.assert_allclose(cached_logits(model, IDS, 4, 16), _reference(family), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation_matches_transformers(family, loaded):
    prompt = [5, 17, 42, 99]
    want = reference_greedy(family, prompt, 12)
    model = loaded(family)
    assert list(stream(model, prompt, 12, stop=[])) == want
    assert list(stream(model, prompt, 12, stop=[], use_cache=False)) == want


@pytest.mark.parametrize("variant", ["f16", "bf16", "sharded"])
def test_half_precision_and_sharded_files(variant, loaded):
    folder, _ = tiny_model("llama", variant)
    if variant == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    model = loaded("llama", variant)
    y = model.backend.to_host(model(model.ids(IDS)))
    np.testing.assert_allclose(y, _reference("llama", variant), atol=1e-4, rtol=0)


def test_every_backend_gives_the_same_logits(backend):
    check_cached_logits_on(backend, "qwen3", IDS)


def test_float64_backend_is_closer(loaded):
    model = loomx.load_model(tiny_model("llama")[0], backend="numpy", dtype="float64")
    y = model.backend.to_host(model(model.ids(IDS)))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, _reference("llama"), atol=1e-4, rtol=0)


def test_bert_padding_mask_matches_transformers(loaded):
    model = loaded("bert")
    ids = IDS.copy()
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    _, ref_model = tiny_model("bert")
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    be = model.backend
    y = be.to_host(model(model.ids(ids), attention_mask=be.from_host(mask.astype(bool))))
    np.testing.assert_allclose(y[0], ref[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(y[1, :5], ref[1, :5].numpy(), atol=1e-4, rtol=0)


def test_network_view_runs_the_same_weights(loaded):
    model = loaded("llama")
    net = model.to_network(IDS.shape[1])
    y, _ = net.forward(model.ids(IDS))
    np.testing.assert_allclose(model.backend.to_host(y), _reference("llama"), atol=1e-4, rtol=0)
    kinds = [type(layer).__name__ for _, layer in net.layers()]
    assert kinds[:7] == ["Embedding", "RMSNorm", "MultiHeadAttention", "Residual", "RMSNorm",
                         "SwiGLU", "Residual"]
    with pytest.raises(ConfigError, match="to_network supports"):
        loaded("gpt2").to_network(4)


def test_wrong_rope_theta_is_visible(tmp_path):
    """A sanity check that the tolerance can catch a subtle configuration error."""
    folder, _ = tiny_model("llama")
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 10000.0
    model = loomx.load_model(folder, config=cfg)
    y = model.backend.to_host(model(model.ids(IDS)))
    assert np.abs(y - _reference("llama")).max() > 1e-2


def test_sampling_is_seeded_and_respects_top_k(loaded):
    model = loaded("llama")
    prompt = [5, 17, 42]
    a = list(stream(model, prompt, 10, temperature=1.0, top_k=5, seed=3, stop=[]))
    b = list(stream(model, prompt, 10, temperature=1.0, top_k=5, seed=3, stop=[]))
    c = list(stream(model, prompt, 10, temperature=1.0, top_k=5, seed=4, stop=[]))
    assert a == b and a != c
    greedy = list(stream(model, prompt, 10, stop=[]))
    assert list(stream(model, prompt, 10, temperature=1.0, top_k=1, seed=9, stop=[])) == greedy
    assert list(stream(model, prompt, 10, temperature=0.7, top_p=1e-9, seed=9,
                       stop=[])) == greedy


def test_stop_tokens_end_generation(loaded):
    model = loaded("llama")
    greedy = list(stream(model, [5, 17, 42], 10, stop=[]))
    cut = list(stream(model, [5, 17, 42], 10, stop=[greedy[3]]))
    assert cut == greedy[:greedy.index(greedy[3])]


def test_choose_token_rules():
    from loomx.backends import get_backend

    from loomx.models.generate import choose_token

    logits = np.log(np.array([0.1, 0.6, 0.3]))
    assert choose_token(logits) == 1
    rng = get_backend("numpy").random(0)
    draws = [choose_token(logits, 1.0, rng=rng) for _ in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
    assert {choose_token(logits, 1.0, top_k=2, rng=rng) for _ in range(300)} == {1, 2}
    assert {choose_token(logits, 1.0, top_p=0.5, rng=rng) for _ in range(100)} == {1}
    assert {choose_token(logits, 1.0, top_p=0.8, rng=rng) for _ in range(300)} == {1, 2}
    with pytest.raises(ConfigError, match="temperature"):
        choose_token(logits, -1.0)


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_sampling_settings_out_of_range_are_config_errors(loaded, kw, match):
    """Refused before the first forward pass, instead of being ignored (top_k 0, top_p > 1)
    or failing later."""
    model = loaded("llama")
    kw = {"max_new_tokens": 3, **kw}
    n = kw.pop("max_new_tokens")
    with pytest.raises(ConfigError, match=match):
        next(stream(model, [5, 17, 42], n, **kw))


def test_generation_with_learned_positions_fills_the_table(loaded):
    """A prompt longer than the position table is an error; otherwise generation runs until
    the table is full, its last token needing no forward pass of its own."""
    model = loaded("gpt2")
    n = model.max_positions
    prompt = [5] * (n - 3)
    assert len(list(stream(model, prompt, 10, stop=[]))) == 4
    with pytest.raises(ConfigError, match="learned position table"):
        next(stream(model, [5] * (n + 1), 3, stop=[]))


def test_cached_generation_of_a_rope_model_runs_past_max_positions(loaded):
    """RoPE models have no position table: the cache holds the whole generation, and numpy
    scalars are valid sampling settings."""
    import numpy as np

    model = loaded("llama")
    prompt = [5] * (model.max_positions - 4)
    assert len(list(stream(model, prompt, 10, stop=[]))) == 10
    assert len(list(stream(model, [5, 6], 3, temperature=np.float32(0.7),
                           top_p=np.float32(0.9), seed=0, stop=[]))) == 3
