"""rlscale's GRPO vs Hugging Face TRL's GRPOTrainer on the same work (run by hand; needs `pip install -e '.[bench]'`).

    python benchmarks/vs_trl.py            # full run (~8 min on a quiet 2-core CPU)
    python benchmarks/vs_trl.py --quick    # smoke run (~3 min)

Same starting weights (a short rlscale SFT warm-start of a tiny Llama, saved to a local directory that both load),
same task (2-digit addition, training split, the same problems in the same order), same batch (8 prompts x 8
generations = 64 completions a step, at most 6 new tokens, temperature 1.0), same objective (token-level "dapo"
loss, clip 0.2 / 0.28, group-scaled advantages, beta = 0, mu = 1, AdamW lr 1e-4 constant with its fused kernel,
transformers' default `adamw_torch_fused` that TRL takes, grad clip 1.0), the same
reward (`task.reward`), no self-verification on the rlscale side (TRL has none). Each run is its own subprocess
(clean peak RSS; no shared state), and the two sides alternate A B A B so that drift of the shared machine cancels
in the per-pair ratio.

Measured: seconds per step after warm-up steps (wall time between consecutive step ends, generation + reward +
loss + backward + optimizer), completions per second, peak RSS (VmHWM of the worker), and held-out greedy
accuracy on 500 eval-split problems after the same number of steps (same completions), evaluated by the same code
for both. Writes benchmarks/results/vs_trl.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G = 8  # generations per prompt
MAX_NEW = 6
LR = 1e-4
DIGITS = 2
EVAL_PROBLEMS, EVAL_SEED = 500, 12345


# ---------------------------------------------------------------- shared pieces (run inside workers)
def _task():
    from rlscale.rl.tasks import ArithmeticParams, make_task

    return make_task(ArithmeticParams(digits=DIGITS))


def _step_problems(task, prompts: int, seed: int, steps: int):
    """The problems of each step exactly as rlscale's train_grpo draws them."""
    return [task.problems(prompts, "train", seed=seed * 1_000_003 + s) for s in range(steps)]


def _load(path: str):
    from rlscale.rl.model import ModelConfig, load_model

    return load_model(ModelConfig(path=path, device="cpu", dtype="float32"))


def greedy_accuracy(model_dir: str) -> float:
    """Held-out greedy accuracy of a saved model, the same code for both sides."""
    from rlscale.rl.generate import sample

    task = _task()
    model, tok = _load(model_dir)
    model.eval()
    problems = task.problems(EVAL_PROBLEMS, "eval", seed=EVAL_SEED)
    batch = sample(model, tok, [p.prompt for p in problems], MAX_NEW, greedy=True)
    return sum(task.is_correct(p, c) for p, c in zip(problems, batch.texts)) / len(problems)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux VmHWM, MB): getrusage's ru_maxrss survives exec, so a worker
    spawned by a large parent would report the parent's size at the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _summary(step_ends: list[tuple[float, float]], t0: tuple[float, float], warmup: int, completions: int) -> dict:
    """Wall and CPU seconds per step over the steps after `warmup` (CPU time is less sensitive to other jobs)."""
    ends = [t0, *step_ends]
    wall = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    sec, cpu_sec = statistics.mean(wall[warmup:]), statistics.mean(cpu[warmup:])
    return {"seconds_per_step": sec, "completions_per_second": completions / sec, "cpu_seconds_per_step": cpu_sec,
            "step_seconds": [round(x, 4) for x in wall]}


# ---------------------------------------------------------------- worker: rlscale
def run_rlscale(job: dict) -> dict:
    from rlscale.rl.accounting import FlopModel, Meter
    from rlscale.rl.grpo import GRPOConfig, train_grpo
    from rlscale.rl.model import save_model

    task = _task()
    model, tok = _load(job["model_dir"])
    steps = job["warmup"] + job["steps"]
    cfg = GRPOConfig(steps=steps, prompts_per_step=job["prompts"], num_generations=G, max_new_tokens=MAX_NEW,
                     temperature=1.0, learning_rate=LR, lr_schedule="constant", warmup_steps=0, beta=0.0,
                     num_iterations=1, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, scale_rewards=True,
                     max_grad_norm=1.0, weight_decay=0.0, self_verify=False, optim="adamw_torch_fused")

    class Log:
        ends: list[float] = []
        rewards: list[float] = []

        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            self.ends.append(_now())
            self.rewards.append(metrics["train/reward_mean"])

    log = Log()
    t0 = _now()
    train_grpo(model, tok, task, cfg, seed=job["seed"], meter=Meter(FlopModel.of(model)), callback=log)
    out = _summary(log.ends, t0, job["warmup"], job["prompts"] * G)
    out.update(peak_rss_mb=peak_rss_mb(), reward_mean_by_step=[round(r, 4) for r in log.rewards])
    if job.get("eval"):
        with tempfile.TemporaryDirectory() as d:
            save_model(model, tok, d)
            out["accuracy"] = greedy_accuracy(d)
    return out


# ---------------------------------------------------------------- worker: TRL
def run_trl(job: dict) -> dict:
    import logging
    import warnings

    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlscale.rl.model import save_model

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)

    task = _task()
    model, tok = _load(job["model_dir"])
    steps = job["warmup"] + job["steps"]
    problems = [p for step in _step_problems(task, job["prompts"], job["seed"], steps) for p in step]
    # TRL tokenises plain-text prompts itself; the char tokenizer adds no specials, so write the bos rlscale
    # prepends into the text (it is matched as the special token: identical prompt ids on both sides)
    ds = Dataset.from_dict({"prompt": [tok.bos_token + p.prompt for p in problems], "idx": list(range(len(problems)))})
    rewards_by_step: list[float] = []

    def addition_reward(prompts, completions, idx, **kwargs):
        r = [task.reward(problems[i], c) for i, c in zip(idx, completions)]
        rewards_by_step.append(sum(r) / len(r))
        return r

    class Timer(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(_now())

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=job["prompts"] * G,
            gradient_accumulation_steps=1, steps_per_generation=1, num_generations=G,
            max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
            num_iterations=1, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
            shuffle_dataset=False, seed=job["seed"], use_cpu=True, bf16=False, fp16=False, report_to="none",
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_pin_memory=False, dataloader_num_workers=0, log_completions=False, use_vllm=False,
            gradient_checkpointing=False,  # TRL's default recomputes activations in backward: work rlscale skips
        )
        timer = Timer()
        trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer])
        t0 = _now()
        trainer.train()
    out = _summary(timer.ends, t0, job["warmup"], job["prompts"] * G)
    out.update(peak_rss_mb=peak_rss_mb(), reward_mean_by_step=[round(r, 4) for r in rewards_by_step])
    if job.get("eval"):
        with tempfile.TemporaryDirectory() as d:
            save_model(trainer.model, tok, d)
            out["accuracy"] = greedy_accuracy(d)
    return out


def worker(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    out = (run_trl if job["side"] == "trl" else run_rlscale)(job)
    print("\nRESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver
def spawn(job: dict, script: str = __file__) -> dict:
    """Run one side in its own process (`script --worker JOB`); its RESULT line, and the process's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise RuntimeError(f"worker failed: {job['side']} (rc {p.returncode})")
    out = json.loads(lines[-1][7:])
    out["process_seconds"] = round(time.perf_counter() - t, 2)
    return out


def warm_start(model_dir: Path, sft_steps: int, threads: int) -> float:
    """SFT the tiny model once with rlscale's train_sft and save it; both trainers start from these weights."""
    import torch

    from rlscale.rl.accounting import FlopModel, Meter
    from rlscale.rl.model import ModelConfig, load_model, save_model
    from rlscale.rl.sft import SFTConfig, train_sft

    marker = model_dir / "vs_trl_sft.json"
    spec = {"size": "tiny", "digits": DIGITS, "steps": sft_steps, "lr": 2e-3, "seed": 0}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return greedy_accuracy(str(model_dir))
    torch.set_num_threads(threads)

    class Quiet:
        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            pass

    model, tok = load_model(ModelConfig(size="tiny", device="cpu", dtype="float32"), seed=0)
    cfg = SFTConfig(steps=sft_steps, verify_fraction=0.0, lr_schedule="constant", learning_rate=2e-3)
    train_sft(model, tok, _task(), cfg, seed=0, meter=Meter(FlopModel.of(model)), callback=Quiet())
    model_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, tok, model_dir)
    marker.write_text(json.dumps(spec))
    return greedy_accuracy(str(model_dir))


def spread(xs: list[float]) -> dict:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}


SIDES = {
    "rlscale": "rlscale train_grpo (each distinct prompt prefilled once, its KV cache shared by its G rows; "
    "identical rows scored once)",
    "trl": "TRL GRPOTrainer (transformers generate, gradient checkpointing off)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, one round per batch size")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: on a shared 2-core box two busy OpenMP threads thrash)")
    ap.add_argument("--sft-steps", type=int, default=500)
    ap.add_argument("--rl-steps", type=int, default=None, help="timed GRPO steps of the accuracy runs (64 completions)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, run in this order: {', '.join(SIDES)}")
    ap.add_argument("--model-dir", default="outputs/vs_trl/sft")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    import torch
    import transformers
    import trl

    t_start = time.perf_counter()
    quick = args.quick
    sides = args.sides.split(",")
    if "trl" not in sides or any(s not in SIDES for s in sides):
        raise SystemExit(f"--sides must name trl and only {', '.join(SIDES)}")
    out_path = Path(args.out or ("benchmarks/results/vs_trl_quick.json" if quick else "benchmarks/results/vs_trl.json"))
    model_dir = ROOT / (args.model_dir + ("_quick" if quick else ""))
    sft_acc = warm_start(model_dir, min(args.sft_steps, 100) if quick else args.sft_steps, args.threads)
    print(f"warm start: {model_dir} greedy accuracy {sft_acc:.3f}", flush=True)

    rl_steps = args.rl_steps or (10 if quick else 100)
    # (prompts per step, rounds, warm-up steps, timed steps, evaluate); at 64 completions the rounds are the 3 seeds
    plan = [(8, 1 if quick else 3, 2, rl_steps, True),
            (32, 1 if quick else 3, 1, 2 if quick else 6, False),
            (128, 1 if quick else 2, 1, 1 if quick else 3, False)]
    results: dict = {}
    for prompts, rounds, warmup, steps, evaluate in plan:
        n = prompts * G
        runs = []
        for r in range(rounds):
            rnd: dict = {}
            for side in sides:  # A B (C) A B (C): neighbours in time share the machine's state
                job = {"side": side, "model_dir": str(model_dir), "prompts": prompts, "seed": r, "warmup": warmup,
                       "steps": steps, "eval": evaluate, "threads": args.threads}
                o = rnd[side] = spawn(job)
                acc = f", accuracy {o['accuracy']:.3f}" if evaluate else ""
                print(f"  {n:5d} completions, round {r}, {side:14s}: {o['seconds_per_step']:.3f} s/step "
                      f"({o['cpu_seconds_per_step']:.3f} CPU s), {o['completions_per_second']:.0f} completions/s, "
                      f"RSS {o['peak_rss_mb']:.0f} MB{acc}", flush=True)
            for side in sides:
                if side != "trl":
                    rnd[f"ratio_{side}"] = rnd[side]["completions_per_second"] / rnd["trl"]["completions_per_second"]
                    rnd[f"cpu_ratio_{side}"] = rnd["trl"]["cpu_seconds_per_step"] / rnd[side]["cpu_seconds_per_step"]
            runs.append(rnd)
        entry: dict = {"prompts_per_step": prompts, "completions_per_step": n, "warmup_steps": warmup,
                       "timed_steps": steps, "completions_trained": n * (warmup + steps)}
        for side in sides:
            e = entry[side] = {k: spread([rnd[side][k] for rnd in runs])
                               for k in ("seconds_per_step", "cpu_seconds_per_step", "completions_per_second",
                                         "peak_rss_mb")}
            if side != "trl":
                e["ratio_vs_trl"] = spread([rnd[f"ratio_{side}"] for rnd in runs])
                e["cpu_ratio_vs_trl"] = spread([rnd[f"cpu_ratio_{side}"] for rnd in runs])
            if evaluate:
                e["accuracy_by_seed"] = [rnd[side]["accuracy"] for rnd in runs]
                e["accuracy_mean"] = round(statistics.mean(e["accuracy_by_seed"]), 4)
                e["train_reward_last10_by_seed"] = [
                    round(statistics.mean(rnd[side]["reward_mean_by_step"][-10:]), 4) for rnd in runs]
        if evaluate:
            trl_accs = entry["trl"]["accuracy_by_seed"]
            for side in sides:
                if side != "trl":
                    m = entry[side]["accuracy_mean"]
                    entry[side]["accuracy_vs_trl"] = ("better than every TRL seed" if m > max(trl_accs) else
                                                      "within the TRL seed spread" if m >= min(trl_accs) else
                                                      "below every TRL seed")
        entry["runs"] = runs
        results[str(n)] = entry

    total = time.perf_counter() - t_start
    result = {
        "benchmark": "vs_trl",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs; load "
                   f"{os.getloadavg()[0]:.1f} at the end), {args.threads} torch thread(s) per worker",
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "quick": quick,
        "sides": {s: SIDES[s] for s in sides},
        "setup": {"model": "llama-tiny (1.1M params) after an rlscale SFT warm-start, loaded by both from one dir",
                  "sft_steps": json.loads((model_dir / "vs_trl_sft.json").read_text())["steps"],
                  "sft_accuracy": sft_acc, "task": f"arithmetic digits={DIGITS} (+), training split",
                  "num_generations": G, "max_new_tokens": MAX_NEW, "temperature": 1.0, "learning_rate": LR,
                  "lr_schedule": "constant", "beta": 0.0, "num_iterations": 1, "loss_type": "dapo",
                  "epsilon": [0.2, 0.28], "scale_rewards": "group", "max_grad_norm": 1.0, "self_verify": False,
                  "optim": "adamw_torch_fused (both sides; transformers' default)",
                  "timing": "wall (and CPU) seconds between step ends after the warm-up steps, one process per run",
                  "eval": f"greedy accuracy on {EVAL_PROBLEMS} eval-split problems (seed {EVAL_SEED}), same code"},
        "results": results,
        "total_seconds": round(total, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'batch':>6} {'side':14} {'s/step':>7} {'CPU s':>7} {'compl/s':>8} {'RSS MB':>7}   "
          "x TRL compl/s min/median/max")
    for n, e in results.items():
        for side in sides:
            s = e[side]
            ratio = "" if side == "trl" else "   " + " / ".join(f"{s['ratio_vs_trl'][k]:.2f}"
                                                             for k in ("min", "median", "max"))
            print(f"{n:>6} {side:14} {s['seconds_per_step']['median']:7.3f} {s['cpu_seconds_per_step']['median']:7.3f} "
                  f"{s['completions_per_second']['median']:8.0f} {s['peak_rss_mb']['max']:7.0f}{ratio}")
    e = results["64"]
    print(f"\nheld-out greedy accuracy after {e['completions_trained']} completions (SFT start {sft_acc:.3f}):")
    for side in sides:
        verdict = f"  ({e[side]['accuracy_vs_trl']})" if side != "trl" else ""
        print(f"  {side:14} per seed {e[side]['accuracy_by_seed']}  mean {e[side]['accuracy_mean']:.3f}{verdict}")
    print(f"total {total / 60:.1f} min; wrote {out_path}")


if __name__ == "__main__":
    main()
