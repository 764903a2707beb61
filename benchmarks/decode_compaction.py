"""What dropping finished rows from the decode batch gains (run by hand, on a quiet machine; needs a trained model).

    python benchmarks/decode_compaction.py MODEL_DIR [--budgets 24 64 128] [--reps 3]

sample() on experiments/smollm2.toml's held-out chat prompts, 32 problems x 4 samples, at several new-token
budgets, with rows leaving the batch once they end (`rl.generate.COMPACT`, the default) and with every row decoded
to the longest (`COMPACT = 2`, the code before), alternated in one process on the same weights and generator seed:
the same answers, compared. Writes benchmarks/results/decode_compaction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rlscale.experiments.config import load_config
from rlscale.rl import generate
from rlscale.rl.chat import for_model
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.tasks import make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--budgets", type=int, nargs="*", default=[24, 64, 128])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/decode_compaction.json")
    args = ap.parse_args()
    cfg = load_config("experiments/smollm2.toml", [])
    model, tok = load_model(ModelConfig(path=args.model_dir))
    model.eval()
    task = for_model(make_task(cfg.task), tok)
    prompts = [p.prompt for p in task.problems(32, "eval", seed=cfg.eval.seed) for _ in range(4)]
    default = generate.COMPACT
    rows = []
    for budget in args.budgets:
        seconds: dict[str, list[float]] = {"all_rows": [], "drop_ended": []}
        texts: list[str] = []
        for _ in range(args.reps):
            for arm, compact in (("all_rows", 2.0), ("drop_ended", default)):
                generate.COMPACT = compact
                t = time.perf_counter()
                b = generate.sample(model, tok, prompts, budget, 1.0, generator=torch.Generator().manual_seed(0))
                seconds[arm].append(round(time.perf_counter() - t, 3))
                texts = texts or b.texts
                assert b.texts == texts, "the answers differ"
                fed = b.decode_tokens
        lengths = b.completion_mask.sum(1).float()
        med = {arm: statistics.median(s) for arm, s in seconds.items()}
        rows.append({"max_new_tokens": budget, "answer_tokens_mean": round(lengths.mean().item(), 1),
                     "answer_tokens_max": int(lengths.max()), "decode_steps": b.completion_ids.shape[1] - 1,
                     "rows_fed_drop_ended": fed, "rows_fed_all_rows": len(prompts) * (b.completion_ids.shape[1] - 1),
                     "seconds": seconds, "median_seconds": med,
                     "speedup": round(med["all_rows"] / med["drop_ended"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    generate.COMPACT = default
    result = {"benchmark": "decode_compaction", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                         f"{torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.1f} at the end",
              "torch": torch.__version__, "model_dir": args.model_dir,
              "setup": "32 held-out chat prompts x 4 samples (128 rows), temperature 1, fp32, same generator seed",
              "compact": default, "budgets": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
