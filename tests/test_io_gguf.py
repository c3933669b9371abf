"""The GGUF reader: names, layout, dequantisation and llama.cpp's Q/K row order, checked by
writing a tiny transformers Llama the way llama.cpp's converter does and reading it back."""

from __future__ import annotations

import numpy as np
import pytest

import loomx
from loomx.errors import FormatError
from loomx.io.gguf import GGUFFile, hf_name, unpermute_rope_rows

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.gguf_names import gguf_name, llama_cpp_permute  # noqa: E402
from tests.tiny_models import VOCAB, tiny_model  # noqa: E402

IDS = np.random.default_rng(1).integers(3, VOCAB, size=(1, 8))


def write_llama_gguf(path, quantize: str | None = None):
    """Write the tiny transformers Llama as GGUF (F32, optionally Q8_0 matrices)."""
    _, model = tiny_model("llama")
    cfg = model.config
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)
    for name, arr in sd.items():
        out = gguf_name(name)
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if quantize and arr.ndim == 2:
            qt = gguf.GGMLQuantizationType[quantize]
            w.add_tensor(out, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(out, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads, hd, d in ((4, 8, 32), (3, 64, 5), (1, 2, 1)):
        w = rng.standard_normal((heads * hd, d))
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
    b = rng.standard_normal(4 * 8)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(b, 4), 4), b)
    with pytest.raises(FormatError, match="even size"):
        unpermute_rope_rows(np.zeros((6, 2)), 2)


def test_names_are_translated():
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.something_new.weight") == "blk.0.something_new.weight"


def test_tensors_and_metadata(llama_gguf):
    f = GGUFFile(llama_gguf)
    _, model = tiny_model("llama")
    sd = model.state_dict()
    assert sorted(f.names()) == sorted(sd)
    for name, t in sd.items():
        assert f.shape(name) == tuple(t.shape)
        np.testing.assert_array_equal(f.host(name), t.numpy())
    cfg = f.config()
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["rope_theta"] == 500000.0 and cfg["tie_word_embeddings"] is False


def test_gguf_model_logits_match_transformers(llama_gguf):
    report = loomx.sniff(llama_gguf)
    assert report.format == "gguf"
    assert report.source_of("num_heads") == "gguf" and report.source_of("rope_theta") == "gguf"
    model = loomx.load_model(report)
    _, ref_model = tiny_model("llama")
    with torch.no_grad():
        ref = ref_model(torch.tensor(IDS)).logits.numpy()
    y = model.backend.to_host(model(model.ids(IDS)))
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


def test_quantised_tensors_are_dequantised(tmp_path):
    path = write_llama_gguf(tmp_path / "q8.gguf", quantize="Q8_0")
    f = GGUFFile(path)
    assert f.dtype("model.layers.0.mlp.up_proj.weight") == "Q8_0"
    _, model = tiny_model("llama")
    w = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    expect = gguf.quants.dequantize(
        gguf.quants.quantize(llama_cpp_permute(w, 4), gguf.GGMLQuantizationType.Q8_0),
        gguf.GGMLQuantizationType.Q8_0)
    got = f.host("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(got, unpermute_rope_rows(expect.reshape(w.shape), 4))
    assert np.abs(got - w).max() < 0.02 * np.abs(w).max()
    import transformers

    same = transformers.LlamaForCausalLM(model.config).eval()
    same.load_state_dict({n: torch.from_numpy(np.array(f.host(n))) for n in f.names()})
    with torch.no_grad():
        ref = same(torch.tensor(IDS)).logits.numpy()
    loaded = loomx.load_model(path)
    y = loaded.backend.to_host(loaded(loaded.ids(IDS)))
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


def test_gguf_converts_to_safetensors(llama_gguf, tmp_path):
    out = GGUFFile(llama_gguf).to_safetensors(tmp_path / "hf")
    a = loomx.load_model(llama_gguf)
    b = loomx.load_model(out)
    assert b.report.source_of("num_heads") == "config"
    np.testing.assert_array_equal(a.backend.to_host(a(a.ids(IDS))),
                                  b.backend.to_host(b(b.ids(IDS))))


def test_bad_gguf_raises_format_error(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(FormatError, match="bad.gguf"):
        GGUFFile(p)
    with pytest.raises(FormatError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")
