"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE) against transformers on the same file."""

from __future__ import annotations

import numpy as np
import pytest

import loomx
from loomx.models import stream
from tests.conftest import assert_close

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import MOE_FAMILIES, VOCAB, tiny_model  # noqa: E402

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))


def _reference(family: str) -> np.ndarray:
    _, model = tiny_model(family)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = loomx.load_model(tiny_model(family)[0], backend="numpy")
        return cache[family]

    return get


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_blocks_are_built_from_the_file(family, loaded):
    model = loaded(family)
    moe = model.blocks[1].mlp
    assert moe.type_name == "moe" and (moe.num_experts, moe.top_k) == (4, 2)
    shared = family == "qwen2_moe"
    assert moe.normalize_topk is not shared  # Qwen2-MoE's norm_topk_prob=False
    assert moe.shared_hidden_features == (40 if shared else None)
    m = 48 if shared else 64
    assert tuple(moe.params["gate_weight"].shape) == (4, m, 32)
    assert model.report.unrecognised == []


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_match_transformers(family, loaded):
    model = loaded(family)
    y = model.backend.to_host(model(model.ids(IDS)))
    ref = _reference(family)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kv_cache_gives_the_same_logits(family, loaded):
    model = loaded(family)
    cache = model.new_cache(2, 16)
    parts = [model.backend.to_host(model(model.ids(IDS[:, :4]), cache))]
    for t in range(4, IDS.shape[1]):
        parts.append(model.backend.to_host(model(model.ids(IDS[:, t:t + 1]), cache)))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), _reference(family), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_generation_matches_transformers(family, loaded):
    _, ref_model = tiny_model(family)
    prompt = [5, 17, 42, 99]
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    model = loaded(family)
    assert list(stream(model, prompt, 12, stop=[])) == want
    assert list(stream(model, prompt, 12, stop=[], use_cache=False)) == want


def test_every_backend_gives_the_same_logits(backend):
    model = loomx.load_model(tiny_model("qwen2_moe")[0], backend=backend)
    cache = model.new_cache(2, 12)
    first = model(model.ids(IDS[:, :6]), cache)
    nxt = model(model.ids(IDS[:, 6:7]), cache)
    ref = _reference("qwen2_moe")
    assert_close(first, ref[:, :6], backend, rtol=0, atol=1e-4)
    assert_close(nxt, ref[:, 6:7], backend, rtol=0, atol=1e-4)
