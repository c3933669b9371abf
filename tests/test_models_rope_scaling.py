"""Llama checkpoints with RoPE scaling (linear, llama3, yarn) against transformers.

The tiny models (``tests/tiny_models.py``) have an original context of 32 positions; the
sequences here run to 40, past it, where a missing or wrong scaling shows far above 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import loomx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import (  # noqa: E402
    ROPE_SCALED,
    VOCAB,
    cached_logits,
    reference_logits,
    tiny_model,
)

IDS = np.random.default_rng(1).integers(3, VOCAB, size=(2, 40))
FAMILIES = sorted(ROPE_SCALED)


def _reference(family: str) -> np.ndarray:
    return reference_logits(family, IDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_past_the_original_context(family, loaded):
    model = loaded(family)
    y = model.backend.to_host(model(model.ids(IDS)))
    ref = _reference(family)
    assert y.shape == ref.shape == (2, 40, VOCAB)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_gives_the_same_logits(family, loaded):
    model = loaded(family)
    np.testing.assert_allclose(cached_logits(model, IDS, 30, 48), _reference(family),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sniff_reports_the_scaling_with_its_source(family):
    report = loomx.sniff(tiny_model(family)[0])
    scaling = report["rope_scaling"]
    want = ROPE_SCALED[family]
    assert scaling["type"] == want["rope_type"] and scaling["factor"] == want["factor"]
    assert report.source_of("rope_scaling") != "default"
    assert report.hparams["rope_scaling"].note == "from rope_parameters"
    assert f"{want['rope_type']} x{want['factor']:g}" in report.architecture
    assert not [w for w in report.warnings if "rope" in w]


def test_old_rope_scaling_key_is_read(loaded):
    """Llama 3.1's config.json form: ``rope_theta`` plus ``rope_scaling`` with ``rope_type``."""
    folder, _ = tiny_model("llama_llama3")
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    report = loomx.sniff(folder, config=cfg)
    assert report.hparams["rope_scaling"].note == "from rope_scaling"
    model = loomx.load_model(folder, config=cfg)
    y = model.backend.to_host(model(model.ids(IDS)))
    np.testing.assert_allclose(y, _reference("llama_llama3"), atol=1e-4, rtol=0)


def test_dropping_the_scaling_is_visible():
    """Without its scaling the same weights give clearly different logits past the context."""
    folder, _ = tiny_model("llama_llama3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    model = loomx.load_model(folder, config=cfg)
    y = model.backend.to_host(model(model.ids(IDS)))
    assert np.abs(y - _reference("llama_llama3")).max() > 1e-2


def test_unsupported_scaling_types_warn_and_are_not_applied():
    folder, _ = tiny_model("llama_linear")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    report = loomx.sniff(folder, config=cfg)
    assert report["rope_scaling"] is None
    assert any("'dynamic'" in w and "not implemented" in w for w in report.warnings)
