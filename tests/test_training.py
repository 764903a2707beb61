"""Short real training runs: SFT then GRPO raises reward; the full pipeline reports every metric;
checkpoint/resume is exact to the step."""

from __future__ import annotations

import pytest
import torch
from tiny import CoinKey

from rlscale.rl import grpo
from rlscale.rl.accounting import PHASES, FlopModel, Meter
from rlscale.rl.checkpoint import latest_checkpoint
from rlscale.rl.generate import sample
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import LoraConfig, ModelConfig, add_lora, count_params, load_model
from rlscale.rl.pipeline import PipelineConfig, run_pipeline
from rlscale.rl.tasks import ArithmeticParams, make_task


def _config(tmp_path, **grpo) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "seed": 0,
        "model": {"size": "nano"},
        "task": {"name": "arithmetic", "digits": 1, "eval_percent": 30},
        "sft": {"steps": 100, "batch_size": 32, "learning_rate": 3e-3, "lr_schedule": "constant"},
        "grpo": {"prompts_per_step": 8, "num_generations": 8, "max_new_tokens": 4, "verify_max_new_tokens": 20,
                 "learning_rate": 2e-4} | grpo,
        "eval": {"problems": 8, "samples": 4, "max_new_tokens": 4, "verify_max_new_tokens": 20},
        "output_dir": str(tmp_path / "run"),
    })


def test_sft_then_grpo_reward_rises(tmp_path, recorder):
    result = run_pipeline(_config(tmp_path, steps=150, self_verify=False), recorder, resume=False)
    reward = recorder.series("train/reward_mean")
    assert len(reward) == 150
    early, late = sum(reward[:20]) / 20, sum(reward[-20:]) / 20
    assert late > early + 0.05, (early, late)
    assert result.metrics["eval/sft_accuracy"] >= 0 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_pipeline_with_self_verification_reports_everything(tmp_path, recorder):
    result = run_pipeline(_config(tmp_path, steps=4, eval_every=2, eval_problems=4), recorder, resume=False)
    m = result.metrics
    for key in ("eval/accuracy", "eval/pass_at_4", "eval/verify_accuracy", "eval/verify_balanced_accuracy",
                "eval/best_of_4_accuracy", "eval/sft_accuracy", "eval/rl_gain", "data/tokens/trained",
                "data/tokens/prompt", "data/tokens/generated", "compute/device_seconds", "compute/gpu_hours"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    for phase in ("sft", "rollout", "verify_rollout", "policy", "eval"):
        assert m[f"compute/flops/{phase}"] > 0 and m[f"compute/device_seconds/{phase}"] > 0, phase
    assert m["compute/flops/reference"] == 0  # beta = 0: no reference model at all
    assert m["compute/flops"] == pytest.approx(sum(m[f"compute/flops/{p}"] for p in PHASES))
    assert m["data/problems"] == 100 * 32 + 4 * 8
    assert m["data/samples/solve"] == 4 * 64 and m["data/samples/verify"] == 4 * 64
    for name in ("train/clip_frac", "train/kl", "train/entropy", "train/completion_len", "train/grad_norm",
                 "train/zero_std_frac", "train/reward_std", "train/verify_reward_mean", "train/verify_loss"):
        assert len(recorder.series(name)) == 4, name
    assert len(recorder.series("eval/accuracy")) == 3  # after SFT, mid-RL, final
    assert len(result.eval_table) == 8 * 4


def _grpo(tmp_path, recorder, **kw):
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = make_task(ArithmeticParams(digits=1))
    cfg = GRPOConfig(steps=6, prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=1e-3,
                     num_iterations=2, beta=0.05, checkpoint_every=2, lr_schedule="cosine", warmup_steps=1)
    meter = Meter(FlopModel.of(model))
    ref, _ = load_model(ModelConfig(size="nano"), seed=0)
    train_grpo(model, tok, task, cfg, seed=3, meter=meter, callback=recorder, ref_model=ref,
               ckpt_dir=tmp_path, **kw)
    return model, meter


def test_resume_gives_identical_next_steps(tmp_path, make_recorder):
    Recorder = make_recorder
    straight = Recorder()
    model_a, _ = _grpo(tmp_path / "a", straight)
    _grpo(tmp_path / "b", Recorder(), stop_after=4)  # "crash" after step 4 (checkpoint at 4)
    assert latest_checkpoint(tmp_path / "b")[:2] == ("rl", 4)
    resumed = Recorder()
    model_b, _ = _grpo(tmp_path / "b", resumed)
    assert [s for s, _ in resumed.logs] == [5, 6]  # no step is run (or counted) twice
    for (sa, ma), (sb, mb) in zip(straight.logs[4:], resumed.logs):
        assert sa == sb
        assert ma["train/loss"] == mb["train/loss"] and ma["train/verify_loss"] == mb["train/verify_loss"]
        assert ma["compute/flops"] == mb["compute/flops"] and ma["data/tokens/trained"] == mb["data/tokens/trained"]
        assert mb["compute/flops/reference"] > 0  # beta > 0 runs the reference forward
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_check_loss_teaches_the_programs_check(recorder):
    """grpo.verify_sft_coef: teacher-forcing the program's check of the shown answers lowers its loss (with the
    RL verdict loss switched off, nothing else trains the check), and its tokens are counted as trained."""
    model, tok = load_model(ModelConfig(size="nano"), seed=0)
    task = make_task(ArithmeticParams(digits=1))
    cfg = GRPOConfig(steps=40, prompts_per_step=8, num_generations=2, max_new_tokens=3, verify_max_new_tokens=20,
                     learning_rate=3e-3, verify_coef=0.0, verify_sft_coef=1.0)
    meter = Meter(FlopModel.of(model))
    train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=recorder)
    loss = recorder.series("train/verify_sft_loss")
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, (loss[:5], loss[-5:])
    # mu = 1: the sampled solve and verify tokens are trained once each, and the check's tokens on top
    m = recorder.logs[-1][1]
    assert m["data/tokens/trained"] > m["data/tokens/generated"]


def _lora_grpo(tmp_path, recorder, **kw):
    """GRPO on a nano model with LoRA adapters; beta > 0 with no reference model: pi_ref is the adapters off."""
    base, tok = load_model(ModelConfig(size="nano"), seed=0)
    model = add_lora(base, LoraConfig(rank=4), seed=0)
    cfg = GRPOConfig(steps=6, prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=1e-2,
                     beta=0.05, checkpoint_every=2, verify_sft_coef=1.0)
    meter = Meter(FlopModel.of(model))
    train_grpo(model, tok, make_task(ArithmeticParams(digits=1)), cfg, seed=3, meter=meter, callback=recorder,
               ckpt_dir=tmp_path, **kw)
    return model


def test_lora_trains_only_adapters_and_resumes_exactly(tmp_path, make_recorder):
    straight = make_recorder()
    model_a = _lora_grpo(tmp_path / "a", straight)
    before, _ = load_model(ModelConfig(size="nano"), seed=0)
    base_a = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model_a.named_parameters()
              if "lora_" not in n}
    assert all(torch.equal(base_a[n], p) for n, p in before.named_parameters())  # the base never moved
    assert any(p.abs().sum() > 0 for n, p in model_a.named_parameters() if "lora_B" in n)  # the adapters did
    assert straight.logs[-1][1]["train/kl"] > 0  # the policy left pi_ref = the same weights with adapters off
    _lora_grpo(tmp_path / "b", make_recorder(), stop_after=4)
    ckpt = latest_checkpoint(tmp_path / "b")[2]
    assert (ckpt / "trainable.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    resumed = make_recorder()
    model_b = _lora_grpo(tmp_path / "b", resumed)
    assert [s for s, _ in resumed.logs] == [5, 6]
    for (_, ma), (_, mb) in zip(straight.logs[4:], resumed.logs):
        assert ma["train/loss"] == mb["train/loss"] and ma["compute/flops"] == mb["compute/flops"]
        assert mb["compute/flops/reference"] > 0
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_lora_pipeline_merges_sft_and_saves_a_plain_model(tmp_path, recorder):
    cfg = _config(tmp_path, steps=3, beta=0.05).model_copy(deep=True)
    cfg.model.lora = LoraConfig(rank=4)
    cfg.sft.steps = 20
    result = run_pipeline(cfg, recorder, resume=False)
    assert result.n_params == count_params(load_model(ModelConfig(size="nano"))[0])
    assert 0 < result.trainable_params < result.n_params / 5
    final, _ = load_model(ModelConfig(path=str(result.model_dir)))
    sft, _ = load_model(ModelConfig(path=str(tmp_path / "run" / "sft")))
    assert not any("lora_" in n for n, _ in final.named_parameters())
    base, _ = load_model(ModelConfig(size="nano"), seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), sft.parameters()))  # SFT adapters merged
    assert result.metrics["compute/flops/reference"] > 0 and result.metrics["eval/accuracy"] >= 0


@pytest.mark.parametrize("mu", [1, 2])
def test_rows_with_zero_advantage_are_left_out_for_the_same_update(monkeypatch, make_recorder, mu):
    """With beta = 0 a row whose advantage is 0 adds nothing to the gradient, so the policy pass leaves it out: the
    same losses, clip fractions and weights (to float rounding) as running every row, for fewer FLOPs counted."""
    runs = {}
    for skip in (False, True):
        monkeypatch.setattr(grpo, "SKIP_ZERO_ADVANTAGE", skip)
        model, tok = load_model(ModelConfig(size="nano"), seed=0)
        task = CoinKey(make_task(ArithmeticParams(digits=1)), share=0.2)  # groups all wrong, and mixed ones
        cfg = GRPOConfig(steps=4, prompts_per_step=8, num_generations=4, max_new_tokens=3, learning_rate=1e-2,
                         beta=0.0, num_iterations=mu, self_verify=False)
        rec, meter = make_recorder(), Meter(FlopModel.of(model))
        train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=rec)
        runs[skip] = model, [m for _, m in rec.logs], meter
    (full, every, m_full), (part, some, m_part) = runs[False], runs[True]
    assert all(0 < m["train/zero_std_frac"] < 1 for m in every)  # rows left out and rows run, each step
    for a, b in zip(every, some):
        for k in ("train/loss", "train/clip_frac", "train/entropy", "train/grad_norm"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), k
        assert b["train/reward_mean"] == a["train/reward_mean"]  # the same answers drawn
    for pa, pb in zip(full.parameters(), part.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)  # AdamW divides a gradient's rounding by its own size too
    assert m_part.flops["policy"] < 0.8 * m_full.flops["policy"] and m_part.flops["rollout"] == m_full.flops["rollout"]


def test_fused_adamw_is_the_same_update_to_float_rounding(monkeypatch, make_recorder):
    """`grpo.optim = 'adamw_torch_fused'` (transformers' default) builds AdamW with its fused kernel: the same steps
    as the unfused one to float rounding."""
    built = []

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.defaults["fused"])

    monkeypatch.setattr(grpo.torch.optim, "AdamW", Spy)
    runs = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        model, tok = load_model(ModelConfig(size="nano"), seed=0)
        cfg = GRPOConfig(steps=3, prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=1e-2,
                         self_verify=False, optim=optim)
        rec = make_recorder()
        train_grpo(model, tok, make_task(ArithmeticParams(digits=1)), cfg, seed=0, meter=Meter(FlopModel.of(model)),
                   callback=rec)
        runs[optim] = model, [m for _, m in rec.logs]
    assert built == [False, True]
    (plain, a), (fused, b) = runs["adamw_torch"], runs["adamw_torch_fused"]
    assert [m["train/reward_mean"] for m in a] == [m["train/reward_mean"] for m in b]  # the same answers drawn
    assert [m["train/loss"] for m in b] == pytest.approx([m["train/loss"] for m in a], abs=1e-5)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_the_entropy_sampling_reads_is_the_policy_pass_entropy(nano):
    """`sample(with_entropy=True)`: the entropy of each drawn token's distribution equals that of the same logits in a
    forward pass over prompt and completion (GRPO logs it without running rows whose advantage is 0)."""
    model, tok = nano
    b = sample(model, tok, ["12+34=", "7*8="] * 4, max_new_tokens=5, temperature=0.7,
               generator=torch.Generator().manual_seed(0), with_entropy=True)
    T = b.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=(b.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -T - 1 : -1]
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    mask = b.completion_mask.bool()
    assert mask.sum() > 8 and torch.allclose(b.entropy[mask], want[mask], atol=1e-5)
