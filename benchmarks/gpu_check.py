"""GPU check: a brief real run of experiments/smollm2.toml and experiments/gpu_qwen.toml on this machine's GPU, and
what each measured: tokens/s and MFU by phase, dollars at the device's price, peak GPU memory. Run by hand.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json   # on a CPU in seconds: the script itself (CI)

Each config is trained in this process (rlscale's runner, the configs' own recipe with `--set`-style overrides: a
few SFT and GRPO steps, a small eval, SFT inside the run) into a temporary MLflow store, and read back from it. A
config whose model weights are not on this machine (gpu_qwen reads models/Qwen2.5-0.5B-Instruct) is recorded as
skipped with the reason; exit code 1 when a config that ran failed. Smoke mode runs the tests' tiny model instead (a
nano Llama on 1-digit addition, as tests/tiny.py; SmolLM2 takes minutes on a CPU) and records both configs skipped.

Tokens/s by phase, from the run's counters (wall time = device-seconds / devices held): `sft` prompt and target
tokens through forward and backward; `rollout` tokens generated in RL (with self-verification in RL the checks
too: then `rollout+verify_rollout`); `policy` completion tokens trained in RL. Evaluation counts no tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from rlscale.experiments.cli_common import Quiet
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl.model import check_model_path
from rlscale.rl.pipeline import InputError
from rlscale.tracking.cost import load_price_table
from rlscale.tracking.run import tracking_uri

REPO = Path(__file__).resolve().parent.parent
CONFIGS: dict[str, str | None] = {"smollm2": "experiments/smollm2.toml", "gpu_qwen": "experiments/gpu_qwen.toml"}
# one run holds SFT and RL; no sampler thread; no quick evals inside RL
COMMON = ["sft.reuse=false", "tracking.system_metrics=false", "grpo.eval_every=0"]
BRIEF = ["sft.steps=4", "grpo.steps=4", "eval.problems=16"]  # on a GPU: the configs' batches, a few steps
SMOKE = {"tiny": None}  # the defaults with TINY: what smoke mode runs
TINY = ["name=gpu-check-tiny", "model.device=cpu", "model.size=nano", "task.digits=1", "task.eval_percent=30",
        "sft.steps=2", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_new_tokens=3",
        "grpo.verify_max_new_tokens=12", "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=3",
        "eval.verify_max_new_tokens=12"]
TOKENS = ("data/tokens/prompt", "data/tokens/generated", "data/tokens/trained")


def value_at(client: MlflowClient, run_id: str, key: str, step: int) -> float:
    """A cumulative metric's value at `step` (the last SFT step: what SFT alone counted), 0 when none was logged."""
    return max((m.value for m in client.get_metric_history(run_id, key) if m.step == step), default=0.0)


def tokens_per_second(client: MlflowClient, run_id: str, m: dict[str, float], held: float) -> dict[str, float]:
    """Tokens/s of the phases that count tokens (see the module's docstring), where the phase ran."""
    sft = {k: value_at(client, run_id, k, int(m.get("eval/sft_steps", 0))) for k in TOKENS}
    seconds = {p: m.get(f"compute/device_seconds/{p}", 0.0) / held for p in ("sft", "rollout", "verify_rollout",
                                                                           "policy")}
    rollout = "rollout+verify_rollout" if seconds["verify_rollout"] > 0 else "rollout"
    tokens = {
        "sft": (sft["data/tokens/prompt"] + sft["data/tokens/trained"], seconds["sft"]),
        rollout: (m["data/tokens/generated"] - sft["data/tokens/generated"],
                  seconds["rollout"] + seconds["verify_rollout"]),
        "policy": (m["data/tokens/trained"] - sft["data/tokens/trained"], seconds["policy"]),
    }
    return {phase: n / s for phase, (n, s) in tokens.items() if n > 0 and s > 0}


def check(name: str, path: str | None, overrides: list[str], root: Path) -> dict[str, Any]:
    """Train the config at `path` (None: the defaults) with `overrides` into the store under `root`; what its run
    measured."""
    cfg = load_config(path, overrides + [f"output_dir={root / name}", f"tracking.root={root / 'mlruns'}"])
    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_experiment(cfg, Quiet(), resume=False)
    wall = time.perf_counter() - t0
    client = MlflowClient(tracking_uri(None, root / "mlruns"))
    run = client.get_run(result.run_id)
    m, tags = run.data.metrics, run.data.tags
    price = load_price_table(cfg.tracking.prices)[tags["device.price_key"]]
    phases = sorted(k.removeprefix("perf/mfu/") for k in m if k.startswith("perf/mfu/"))
    return {
        "status": "ok", "config": path or "defaults", "overrides": overrides, "run_id": result.run_id,
        "device": tags["device.name"], "device_count": float(tags["device.count"]),
        "dtype": tags["device.dtype"], "wall_seconds": round(wall, 2),
        "sft_steps": int(m.get("eval/sft_steps", 0)), "grpo_steps": cfg.grpo.steps, "flops": m["compute/flops"],
        "device_seconds": m["compute/device_seconds"],
        "tokens_per_second": tokens_per_second(client, result.run_id, m, float(tags["device.count"])),
        "mfu": {p: m[f"perf/mfu/{p}"] for p in phases}, "mfu_run": m.get("perf/mfu"),
        "flops_per_second": {p: m[f"perf/flops_per_second/{p}"] for p in phases},
        "peak_flops": m.get("perf/peak_flops"), "peak_source": tags.get("perf.peak_source"),
        "usd": m["cost/usd"], "price": {"key": price.key, "usd_per_hour": price.usd_per_hour, "unit": price.unit,
                                        "source": price.source, "date": price.date},
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "eval_accuracy": m.get("eval/accuracy"),
    }


def skipped(path: str, why: str) -> dict[str, Any]:
    """A config not run, and why (smoke mode; its weights are not here: said in either case)."""
    try:
        check_model_path(load_config(path).model.path or "")
    except (OSError, ValueError) as e:
        why += f"; its weights are not on this machine ({str(e).splitlines()[0]})"
    return {"status": "skipped", "config": path, "reason": why}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="on a CPU, one step of each phase (seconds; CI)")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    os.chdir(REPO)  # the configs name their data relative to the repository
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # every run goes to this check's own temporary store
    overrides = COMMON + (TINY if args.smoke else BRIEF)
    configs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, path in (SMOKE | CONFIGS if args.smoke else CONFIGS).items():
            if args.smoke and path is not None:
                configs[name] = skipped(path, "smoke mode runs the tiny model on the CPU instead")
                continue
            try:
                configs[name] = check(name, path, overrides, Path(tmp))
            except InputError as e:  # weights missing, or another input the config names
                configs[name] = skipped(str(path), f"not run: {e}")
            except Exception as e:
                traceback.print_exc()
                configs[name] = {"status": "failed", "config": path or "defaults", "overrides": overrides,
                                 "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{name}: {configs[name]['status']} {configs[name].get('reason', '')}", file=sys.stderr)
    cuda = torch.cuda.is_available() and not args.smoke
    result = {
        "benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d"), "mode": "smoke" if args.smoke else "gpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "configs": configs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if any(c["status"] == "failed" for c in configs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
