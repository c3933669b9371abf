"""The sniffer: what tensors alone tell, what needs config.json, and where each value came from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import loomx
from loomx.cli import main
from loomx.errors import ConfigError, FormatError
from loomx.io.safetensors import open_safetensors, save_safetensors

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import tiny_model  # noqa: E402

# family → expected (hyperparameter: value) from the tensors alone
SHAPES = {
    "llama": dict(hidden_size=32, vocab_size=160, num_layers=2, q_width=32, kv_width=16,
                  intermediate_size=64, gated_mlp=True, norm="rms", qk_norm=False,
                  qkv_layout="separate", tied_head=False, positions="rope", q_bias=False),
    "qwen2": dict(q_width=32, kv_width=16, q_bias=True, k_bias=True, v_bias=True, o_bias=False,
                  tied_head=True),
    "qwen3": dict(q_width=64, kv_width=32, qk_norm=True, head_dim=16, num_heads=4,
                  num_kv_heads=2),
    "gemma": dict(q_width=64, tied_head=True, norm="rms"),
    "phi3": dict(qkv_layout="fused", mlp_layout="fused", q_width=32, kv_width=16,
                 intermediate_size=64, gated_mlp=True),
    "gpt2": dict(qkv_layout="conv1d", conv1d_weights=True, positions="learned", max_positions=64,
                 norm="layer", gated_mlp=False, intermediate_size=128, tied_head=True,
                 mlp_bias=True, o_bias=True),
    "gpt_neox": dict(qkv_layout="interleaved", norm="layer", tied_head=False, q_bias=True),
    "bert": dict(kind="encoder", residual="post_norm", positions="learned", token_types=2,
                 embed_norm=True, norm="layer"),
    "phi": dict(residual="parallel", head_bias=True, norm="layer"),
}
# family → expected values that must come from config.json
CONFIG = {
    "llama": dict(num_heads=4, num_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6,
                  activation="silu", residual="pre_norm"),
    "gemma": dict(norm_unit_offset=True, embed_scale=32 ** 0.5, activation="gelu_pytorch_tanh",
                  head_dim=16),
    "gpt_neox": dict(residual="parallel", rope_fraction=0.5, activation="gelu"),
    "gpt2": dict(num_heads=4, activation="gelu_new", norm_eps=1e-5),
    "phi": dict(rope_fraction=0.5),
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_shapes_tell_structure(family):
    folder, _ = tiny_model(family)
    for cfg in (None, {}):
        report = loomx.sniff(folder, config=cfg)
        for name, want in SHAPES[family].items():
            if name in ("head_dim", "num_heads", "num_kv_heads") and cfg == {}:
                continue
            assert report[name] == want, (family, name, report[name])
            if name in ("head_dim",) and family == "qwen3":
                assert report.source_of(name) == "shapes"
            elif cfg == {} and name != "kind":
                assert report.source_of(name) == "shapes", (family, name)
        assert report.unrecognised == []


@pytest.mark.parametrize("family", sorted(CONFIG))
def test_config_values_and_their_source(family):
    folder, _ = tiny_model(family)
    report = loomx.sniff(folder)
    for name, want in CONFIG[family].items():
        got = report[name]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, name
        assert report.source_of(name) in ("config", "shapes"), name
    assert report.source_of("num_heads") == "config"


def test_without_config_the_report_says_default():
    folder, _ = tiny_model("llama")
    report = loomx.sniff(folder, config={})
    for name in ("num_heads", "rope_theta", "norm_eps", "activation"):
        assert report.source_of(name) == "default", name
    assert report["rope_theta"] == 10000.0
    # the guess: the largest common head size dividing q width 32 and kv width 16
    assert report["head_dim"] == 16 and report["num_heads"] == 2 and report["num_kv_heads"] == 1
    text = str(report)
    assert "default" in text and "unrecognised tensors (0)" in text


def test_qwen3_head_dim_comes_from_qk_norm_without_config():
    report = loomx.sniff(tiny_model("qwen3")[0], config={})
    assert report["head_dim"] == 16 and report.source_of("head_dim") == "shapes"
    assert report["num_heads"] == 4 and report["num_kv_heads"] == 2


@pytest.mark.parametrize("form", ["old", "new", "per_layer_type"])
def test_rope_key_forms(form):
    folder, _ = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters")
    if form == "old":
        cfg.update(rope_theta=12345.0, partial_rotary_factor=0.5)
    elif form == "new":
        cfg["rope_parameters"] = {"rope_theta": 12345.0, "partial_rotary_factor": 0.5,
                                  "rope_type": "default"}
    else:
        cfg["rope_parameters"] = {
            "full_attention": {"rope_theta": 12345.0, "rope_type": "default",
                               "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
    report = loomx.sniff(folder, config=cfg)
    assert report["rope_theta"] == 12345.0 and report.source_of("rope_theta") == "config"
    assert report["rope_fraction"] == 0.5


def test_gpt_neox_old_rotary_pct_key():
    folder, _ = tiny_model("gpt_neox")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rotary_pct=0.25, rotary_emb_base=10000)
    assert loomx.sniff(folder, config=cfg)["rope_fraction"] == 0.25


def test_unsupported_rope_scaling_is_warned():
    folder, _ = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    report = loomx.sniff(folder, config=cfg)
    assert any("dynamic" in w for w in report.warnings)


def test_incomplete_rope_scaling_is_warned():
    folder, _ = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}  # no low/high_freq_factor
    report = loomx.sniff(folder, config=cfg)
    assert any("llama3" in w for w in report.warnings)


def test_unknown_tensors_are_listed_not_dropped(tmp_path):
    folder, _ = tiny_model("llama")
    src = open_safetensors(folder)
    arrays = {n: np.array(src.host(n)) for n in src.names()}
    arrays["model.layers.0.self_attn.mystery.weight"] = np.zeros((3, 3), np.float32)
    arrays["vision_tower.patch.weight"] = np.zeros((2,), np.float32)
    arrays["model.rotary_emb.inv_freq"] = np.zeros((4,), np.float32)
    save_safetensors(arrays, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    report = loomx.sniff(tmp_path)
    assert report.unrecognised == ["model.layers.0.self_attn.mystery.weight",
                                   "vision_tower.patch.weight"]
    assert [n for n, _ in report.ignored] == ["model.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.mystery.weight" in str(report)


def test_moe_experts_are_reported(tmp_path):
    import torch
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=3)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    report = loomx.sniff(tmp_path)
    assert report["num_experts"] == 3 and report.source_of("num_experts") == "shapes"
    assert report["intermediate_size"] == 48 and report["experts_per_token"] == 2
    assert report.unrecognised == []
    moe = loomx.load_model(report, backend="numpy").blocks[0].mlp
    assert moe.type_name == "moe" and (moe.num_experts, moe.top_k) == (3, 2)
    assert tuple(moe.params["gate_weight"].shape) == (3, 48, 32)


def test_not_a_transformer(tmp_path):
    save_safetensors({"conv.weight": np.zeros((4, 3, 3, 3), np.float32)},
                     tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="no token embedding"):
        loomx.sniff(tmp_path)


def test_inconsistent_config_is_an_error():
    folder, _ = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(num_attention_heads=3, head_dim=None)
    with pytest.raises(FormatError, match="attention widths disagree"):
        loomx.sniff(folder, config=cfg)


def test_cli_sniff_prints_the_report(capsys):
    folder, _ = tiny_model("gpt2")
    assert main(["sniff", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "decoder (gpt2)" in out and "qkv_layout" in out and "conv1d" in out
    assert main(["sniff", str(folder), "--json", "--no-config"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hparams"]["num_heads"]["source"] == "default"
    assert data["hparams"]["hidden_size"] == {"value": 32, "source": "shapes", "note": ""}
    assert main(["sniff", str(folder / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad input


def _toy_copy(tmp_path, cfg_update=None, tensors_update=None, gen=None, name="toy"):
    """The toy Llama with keys added to its config.json, tensors added to (or replaced in)
    its file, and a generation_config.json, where given."""
    from loomx.models.toy import write_toy_llama

    folder = write_toy_llama(tmp_path / name)
    if cfg_update:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(cfg_update)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors_update:
        f = open_safetensors(folder / "model.safetensors")
        tensors = {n: np.array(f.host(n)) for n in f.names()}
        f.close()
        tensors.update(tensors_update)
        save_safetensors(tensors, folder / "model.safetensors")
    if gen is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


@pytest.mark.parametrize("case, kw, error, match", [
    ("zero heads", dict(cfg_update={"num_attention_heads": 0}), ConfigError,
     "num_attention_heads.*positive"),
    ("text heads", dict(cfg_update={"num_key_value_heads": "two"}), ConfigError,
     "num_key_value_heads.*integer"),
    ("generation_config list", dict(gen=[1, 2]), FormatError, "generation_config.*object"),
    ("1-d embedding", dict(tensors_update={"model.embed_tokens.weight":
                                           np.zeros(128, np.float32)}),
     FormatError, r"embed_tokens.*\[vocab, hidden\]"),
    ("text rope_theta", dict(cfg_update={"rope_theta": "1e4x"}), ConfigError,
     "rope_theta.*number"),
])
def test_bad_checkpoints_raise_loomx_errors(tmp_path, capsys, case, kw, error, match):
    folder = _toy_copy(tmp_path, **kw)
    with pytest.raises(error, match=match):
        loomx.sniff(folder)
    assert main(["sniff", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name, shape", [
    ("model.layers.1.mlp.gate_proj.weight", (96, 64)),
    ("model.layers.1.self_attn.k_proj.weight", (48, 64)),
    ("model.layers.1.input_layernorm.weight", (60,)),
    ("lm_head.weight", (100, 64)),
])
def test_load_model_checks_every_tensor_shape(tmp_path, name, shape):
    folder = _toy_copy(tmp_path, tensors_update={
        name: (_RNG.normal(size=shape) * 0.02).astype(np.float32)})
    want = {"gate_proj": [128, 64], "k_proj": [32, 64], "input_layernorm": [64],
            "lm_head": [128, 64]}[next(k for k in ("gate_proj", "k_proj", "input_layernorm",
                                                     "lm_head") if k in name)]
    with pytest.raises(FormatError) as info:
        loomx.load_model(folder, backend="numpy")
    msg = str(info.value)
    assert name in msg and str(list(shape)) in msg and str(want) in msg


@pytest.mark.parametrize("config, match", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights=false"),
    ({"model_type": "roberta"}, "roberta's position ids"),
    ({"model_type": "gemma3_text"}, "Gemma 3"),
    ({"logit_scale": 0.0625}, "logit_scale"),
], ids=["attn_softcap", "final_softcap", "qpas", "inverse_layer_idx", "unscaled",
        "roberta", "gemma3", "logit_scale"])
def test_features_that_change_every_output_are_refused_not_ignored(tmp_path, config, match):
    """The sniffer reports them; load_model refuses instead of computing something else."""
    import loomx
    from loomx.errors import ConfigError

    folder = _toy_copy(tmp_path, config)
    report = loomx.sniff(folder)
    assert any(match in w and "refusing to load" in w for w in report.warnings)
    with pytest.raises(ConfigError, match=match):
        loomx.load_model(folder, backend="numpy")


def test_block_tensors_that_fit_no_role_are_refused(tmp_path):
    import numpy as np

    import loomx
    from loomx.errors import ConfigError

    folder = _toy_copy(tmp_path, tensors_update={
        "model.layers.0.self_attn.q_layernorm.weight": np.ones(16, np.float32)})
    with pytest.raises(ConfigError, match="1 block tensors that fit no role"):
        loomx.load_model(folder, backend="numpy")


def test_config_keys_of_other_families_are_read(tmp_path):
    """generation_config's stop ids win (as in transformers' generate); StarCoder2's
    norm_epsilon, GPT-NeoX's rotary_emb_base and its 0.25 rotary default; Gemma's 'gelu'."""
    import loomx

    r = loomx.sniff(_toy_copy(tmp_path, {"eos_token_id": 2, "rms_norm_eps": None,
                                         "norm_epsilon": 0.01},
                              gen={"eos_token_id": [2, 7]}, name="a"))
    assert r["eos_token_id"] == [2, 7]
    assert r["norm_eps"] == pytest.approx(0.01)
    r = loomx.sniff(_toy_copy(tmp_path, {"model_type": "gpt_neox", "rope_theta": None,
                                         "rotary_emb_base": 1e6}, name="b"))
    assert r["rope_theta"] == 1e6 and r["rope_fraction"] == pytest.approx(0.25)
    r = loomx.sniff(_toy_copy(tmp_path, {"model_type": "gemma", "hidden_act": "gelu"},
                              name="c"))
    assert r["activation"] == "gelu_tanh"
