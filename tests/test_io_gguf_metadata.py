"""GGUF metadata that changes the model: Gemma's stored norms and activation, rope scaling,
missing keys, and converting to safetensors without destroying an existing folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import loomx
from loomx.errors import FormatError
from loomx.io.gguf import GGUFFile
from loomx.io.safetensors import SafetensorsFile
from loomx.models.toy import write_toy_llama
from tests.gguf_names import gguf_name, llama_cpp_permute

gguf = pytest.importorskip("gguf")

def write_gguf(path, src_folder, arch="llama", heads=True, extra=None, bad_rows=None,
               rope_freqs=False):
    """The toy Llama at ``src_folder`` written the way llama.cpp's converter writes ``arch``.

    For Gemma archs the norm weights are stored as 1 + γ, as the converter does.
    """
    f = SafetensorsFile(os.path.join(src_folder, "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    if heads:
        w.add_head_count(4)
        w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for k, v in (extra or {}).items():
        getattr(w, k)(*v)
    for name in f.names():
        arr = np.array(f.host(name), np.float32)
        out = gguf_name(name)
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, 4)
        if arch == "llama" and name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, 2)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            arr = arr + 1.0
        if name == bad_rows:
            arr = arr[:62]
        w.add_tensor(out, np.ascontiguousarray(arr))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_llama(folder)
    # non-trivial norm weights, so a wrong (1 + γ) handling shows in the logits
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: np.array(f.host(n)) for n in f.names()}
    f.close()
    rng = np.random.default_rng(3)
    for n, t in tensors.items():
        if n.endswith("norm.weight"):
            tensors[n] = (1.0 + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)
    from loomx.io.safetensors import save_safetensors

    save_safetensors(tensors, folder / "model.safetensors")
    return str(folder)


def _gemma_folder(toy, tmp_path):
    """The toy weights as a Hugging Face Gemma folder (norms stored as γ, effective 1 + γ)."""
    folder = tmp_path / "gemma_hf"
    folder.mkdir()
    f = SafetensorsFile(os.path.join(toy, "model.safetensors"))
    tensors = {n: np.array(f.host(n)) for n in f.names()}
    f.close()
    for n in tensors:
        if n.endswith("norm.weight"):
            tensors[n] = tensors[n] - 1.0
    from loomx.io.safetensors import save_safetensors

    save_safetensors(tensors, folder / "model.safetensors")
    cfg = json.load(open(os.path.join(toy, "config.json")))
    cfg.update(model_type="gemma", hidden_activation="gelu_pytorch_tanh",
               architectures=["GemmaForCausalLM"], head_dim=16)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_gemma_gguf_norms_are_not_offset_twice_and_use_gelu_tanh(toy, tmp_path):
    hf_folder = _gemma_folder(toy, tmp_path)
    path = write_gguf(tmp_path / "gemma.gguf", hf_folder, arch="gemma")
    report = loomx.sniff(path)
    assert report["norm_unit_offset"] is False
    assert report.source_of("norm_unit_offset") == "gguf"
    assert report["activation"] in ("gelu_tanh", "gelu_pytorch_tanh")
    assert report["embed_scale"] == pytest.approx(8.0)
    hf = loomx.load_model(hf_folder, backend="numpy")
    assert hf.report["norm_unit_offset"] is True
    model = loomx.load_model(path, backend="numpy")
    ids = model.ids([[1, 5, 9, 20, 3]])
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(hf(hf.ids([[1, 5, 9, 20, 3]]))),
                               atol=1e-5, rtol=0)


def test_gemma_gguf_converts_back_to_hugging_face_norms(toy, tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", _gemma_folder(toy, tmp_path), arch="gemma")
    out = GGUFFile(path).to_safetensors(tmp_path / "conv")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["hidden_act"] == "gelu_pytorch_tanh"
    a = loomx.load_model(path, backend="numpy")
    b = loomx.load_model(out, backend="numpy")
    ids = [[4, 8, 15, 16, 23]]
    np.testing.assert_allclose(np.asarray(a(a.ids(ids))), np.asarray(b(b.ids(ids))),
                               atol=1e-5, rtol=0)


def test_linear_rope_scaling_is_read_from_gguf(toy, tmp_path):
    path = write_gguf(tmp_path / "lin.gguf", toy, extra={
        "add_rope_scaling_type": (gguf.RopeScalingType.LINEAR,),
        "add_rope_scaling_factor": (4.0,)})
    report = loomx.sniff(path)
    assert report["rope_scaling"] == {"type": "linear", "factor": 4.0}
    assert report.source_of("rope_scaling") == "gguf"
    ref_folder = tmp_path / "lin_hf"
    ref_folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (ref_folder / name).write_bytes(open(os.path.join(toy, name), "rb").read())
    cfg = json.loads((ref_folder / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (ref_folder / "config.json").write_text(json.dumps(cfg))
    a, b = loomx.load_model(path, backend="numpy"), loomx.load_model(ref_folder, backend="numpy")
    ids = [list(range(1, 40))]
    np.testing.assert_allclose(np.asarray(a(a.ids(ids))), np.asarray(b(b.ids(ids))),
                               atol=1e-5, rtol=0)


def test_yarn_rope_scaling_is_read_from_gguf(toy, tmp_path):
    path = write_gguf(tmp_path / "yarn.gguf", toy, extra={
        "add_rope_scaling_type": (gguf.RopeScalingType.YARN,),
        "add_rope_scaling_factor": (4.0,), "add_rope_scaling_orig_ctx_len": (64,),
        "add_rope_scaling_yarn_beta_fast": (16.0,)})
    scaling = loomx.sniff(path)["rope_scaling"]
    assert scaling["type"] == "yarn"
    assert scaling["factor"] == 4.0
    assert scaling["original_max_position_embeddings"] == 64
    assert scaling["beta_fast"] == 16.0 and scaling["beta_slow"] == 1.0


def test_rope_freqs_tensor_is_warned_about(toy, tmp_path):
    path = write_gguf(tmp_path / "freqs.gguf", toy, rope_freqs=True)
    report = loomx.sniff(path)
    assert any("rope_freqs" in w for w in report.warnings)
    assert "rope_freqs.weight" in report.unrecognised


def test_missing_head_count_is_a_format_error_naming_the_key(toy, tmp_path):
    path = write_gguf(tmp_path / "nohead.gguf", toy, heads=False)
    with pytest.raises(FormatError, match=r"nohead\.gguf.*llama\.attention\.head_count"):
        loomx.load_model(path, backend="numpy")
    with pytest.raises(FormatError, match="llama.attention.head_count"):
        GGUFFile(path).to_safetensors(tmp_path / "conv")
    assert not (tmp_path / "conv" / "model.safetensors").exists()


def test_failed_conversion_keeps_the_existing_folder(toy, tmp_path):
    good = write_gguf(tmp_path / "good.gguf", toy)
    out = GGUFFile(good).to_safetensors(tmp_path / "conv")
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    bad = write_gguf(tmp_path / "bad.gguf", toy,
                     bad_rows="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(FormatError, match=r"blk\.1\.attn_q\.weight"):
        GGUFFile(bad).to_safetensors(tmp_path / "conv")
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_a_folder_of_several_gguf_files_asks_for_one(toy, tmp_path):
    folder = tmp_path / "quants"
    folder.mkdir()
    for name in ("model-Q8_0.gguf", "model-F16.gguf"):
        write_gguf(folder / name, toy)
    with pytest.raises(FormatError, match="2 GGUF files .*model-F16.gguf.*pass one of them"):
        loomx.sniff(folder)
    assert loomx.sniff(folder / "model-F16.gguf")["num_heads"] > 0


def test_gguf_file_closes_at_the_end_of_a_with_block(toy, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", toy)
    with GGUFFile(path) as f:
        assert f.config()["num_attention_heads"] > 0
        assert _mapped(path)
    assert not _mapped(path)  # the reader and every tensor's memory map are dropped


def _mapped(path) -> bool:
    """Whether this process has ``path`` memory-mapped (Linux: /proc/self/maps)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps here")
    import gc

    gc.collect()
    with open("/proc/self/maps") as maps:
        return any(str(path) in line for line in maps)


def test_per_layer_head_counts_do_not_break_the_config(toy, tmp_path):
    path = write_gguf(tmp_path / "heads.gguf", toy, heads=False,
                      extra={"add_head_count": ([4, 4],)})
    assert GGUFFile(path).config()["num_attention_heads"] == [4, 4]


def _bpe_extra(pre):
    """A byte-level BPE vocabulary of single bytes (no merges) with ``tokenizer.ggml.pre``."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(set(ByteLevel.alphabet()))
    extra = {"add_tokenizer_model": ("gpt2",), "add_token_list": (tokens,),
             "add_token_merges": ([],), "add_token_types": ([1] * len(tokens),)}
    if pre is not None:
        extra["add_tokenizer_pre"] = (pre,)
    return extra


@pytest.mark.parametrize("pre, words", [
    ("llama-bpe", ["Hello", " world", " ", "123", "45", "!!"]),
    ("qwen2", ["Hello", " world", " ", "1", "2", "3", "4", "5", "!!"]),
    ("gpt2", ["Hello", " world", " 12345", "!!"]),
    (None, ["Hello", " world", " 12345", "!!"]),
])
def test_gguf_tokenizer_splits_text_as_its_pre_type_says(toy, tmp_path, pre, words):
    """llama.cpp's ``tokenizer.ggml.pre`` picks the split before BPE: Llama 3 groups up to
    three digits, Qwen2 splits each, GPT-2 keeps a number whole."""
    pytest.importorskip("tokenizers")
    path = write_gguf(tmp_path / "tok.gguf", toy, extra=_bpe_extra(pre))
    tok = GGUFFile(path).tokenizer()
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello world 12345!!")]
    assert [tok.decoder.decode([p]) for p in pieces] == words


def test_an_unknown_gguf_pre_type_warns(toy, tmp_path):
    pytest.importorskip("tokenizers")
    path = write_gguf(tmp_path / "tok.gguf", toy, extra=_bpe_extra("some-new-model"))
    with pytest.warns(UserWarning, match="pre-splitting 'some-new-model' is not known"):
        GGUFFile(path).tokenizer()


def test_a_split_gguf_asks_for_the_merged_file(toy, tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    for k in (1, 2):
        write_gguf(folder / f"model-0000{k}-of-00002.gguf", toy)
    for where in (folder, folder / "model-00001-of-00002.gguf"):
        with pytest.raises(FormatError, match="a split GGUF .*llama-gguf-split --merge"):
            loomx.sniff(where)
