"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE): what is built from the file, and backends.

Logits, KV-cache decoding and greedy generation against transformers are checked for these
families with every other family in ``tests/test_models_families.py``."""

from __future__ import annotations

import numpy as np
import pytest

import loomx
from tests.conftest import assert_close

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import (  # noqa: E402
    MOE_FAMILIES,
    VOCAB,
    LoadedModels,
    reference_logits,
    tiny_model,
)

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))


def _reference(family: str) -> np.ndarray:
    return reference_logits(family, IDS)


@pytest.fixture(scope="module")
def loaded():
    return LoadedModels()


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


def test_every_backend_gives_the_same_logits(backend):
    model = loomx.load_model(tiny_model("qwen2_moe")[0], backend=backend)
    cache = model.new_cache(2, 12)
    first = model(model.ids(IDS[:, :6]), cache)
    nxt = model(model.ids(IDS[:, 6:7]), cache)
    ref = _reference("qwen2_moe")
    assert_close(first, ref[:, :6], backend, rtol=0, atol=1e-4)
    assert_close(nxt, ref[:, 6:7], backend, rtol=0, atol=1e-4)
