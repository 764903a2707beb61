"""One held-out evaluation timed, with its scores (run by hand, on a quiet machine): a config's eval of a trained
model folder, e.g. the final model of benchmarks/smollm2_verify.py.

    python benchmarks/eval_time.py MODEL_DIR --label after [--config experiments/smollm2_verify.toml] [--set K=V]

Each result is kept in benchmarks/results/eval_time.json under its label: run it from two checkouts (code before and
after a change) on the same model folder to compare the same problems, seed and answers. `answers_sha256` hashes
every sampled answer in order: equal hashes (and equal greedy accuracy) mean the same answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from rlscale.experiments.config import load_config
from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.chat import for_model
from rlscale.rl.evaluate import evaluate
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--label", required=True, help="Name of this measurement, e.g. before or after.")
    ap.add_argument("--config", default="experiments/smollm2_verify.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="benchmarks/results/eval_time.json")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    model, tok = load_model(ModelConfig(path=args.model_dir, dtype=cfg.model.dtype), seed=cfg.seed)
    model.eval().requires_grad_(False)  # frozen, as the pipeline's sampling copy (model.lora.merged_sampling) is
    task = for_model(make_task(cfg.task), tok)
    problems = task.problems(cfg.eval.problems, "eval", seed=cfg.eval.seed)
    meter = Meter(FlopModel.of(model))
    load = os.getloadavg()[0]
    t = time.perf_counter()
    metrics, table = evaluate(model, tok, task, problems, cfg.eval, meter, torch.Generator().manual_seed(cfg.eval.seed))
    wall = time.perf_counter() - t
    answers = json.dumps([row["answer"] for row in table])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config, "overrides": args.overrides,
        "model_dir": args.model_dir, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "load_average_before": round(load, 2), "problems": len(problems), "samples": cfg.eval.samples,
        "wall_seconds": round(wall, 1), "eval_flops": meter.flops["eval"],
        "answers_sha256": hashlib.sha256(answers.encode()).hexdigest()[:16],
        "metrics": {k.removeprefix("eval/"): round(v, 4) for k, v in metrics.items()},
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps(kept | {args.label: result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
