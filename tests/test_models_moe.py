"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE): what is built from the file, and backends.

Logits, KV-cache decoding and greedy generation against transformers are checked for these
families with every other family in ``tests/test_models_families.py``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import (  # noqa: E402
    MOE_FAMILIES,
    VOCAB,
    check_cached_logits_on,
    reference_logits,
)

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))


def _reference(family: str) -> np.ndarray:
    return reference_logits(family, IDS)


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
    check_cached_logits_on(backend, "qwen2_moe", IDS)
