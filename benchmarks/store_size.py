"""Size and write time of the embedded SQLite store per 1,000 runs (fake runs of the run schema, nothing trained).

    python benchmarks/store_size.py [--runs 1000] [--repeats 3]

Each repeat writes `--runs` runs with benchmarks/fake_runs.py into a fresh SQLite store in a temp dir (tables
created first, not timed), checkpoints the WAL into the database file and measures its size, then times reading
every run back (`search_runs`, as `rlscale runs list` and the report do). Fake runs log one value per metric; a
real run logs its metrics every step, so it also measures what one more logged value adds to the store and, from
three tiny real trainings, how many values a run logs per SFT and per GRPO step, and extrapolates to a run of
experiments/addition.toml. Writes benchmarks/results/store_size.json.
fake_runs.py commits without waiting for the disk (synchronous=OFF), so the write times are a lower bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_runs import T0, store_uri, write_fake_runs  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "store_size.json"


def one(runs: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        uri = store_uri(db)  # empty store with MLflow's tables: its size is the fixed part
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        empty = db.stat().st_size
        t0 = time.perf_counter()
        fates = write_fake_runs(uri, runs, seed)
        write = time.perf_counter() - t0
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.stat().st_size
        client = MlflowClient(uri)
        t0 = time.perf_counter()
        ids = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(ids, max_results=50_000)
        read = time.perf_counter() - t0
        assert len(found) == runs, (len(found), runs)
        return {"fates": fates, "empty_bytes": empty, "file_bytes": size, "write_seconds": write,
                "read_all_seconds": read}


def metric_history_bytes(steps: int = 2000, metrics: int = 10) -> float:
    """Bytes one more logged metric value (a step of a metric's history) adds to the store."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        client = MlflowClient(store_uri(db))
        run_id = client.create_run(client.create_experiment("history")).info.run_id
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = db.stat().st_size
        for start in range(0, steps, 100):  # log_batch takes up to 1,000 metrics a call
            client.log_batch(run_id, metrics=[Metric(f"train/m{k}", float(s * k), T0 + s, s)
                                              for s in range(start, start + 100) for k in range(metrics)])
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return (db.stat().st_size - before) / (steps * metrics)


def values_per_step() -> dict[str, float]:
    """Metric values a real (tiny) run logs per SFT step and per GRPO step: the difference between short runs."""
    import torch

    from rlscale.experiments.config import load_config
    from rlscale.experiments.runner import run_experiment

    class Quiet:
        def on_log(self, step, metrics):
            pass

    torch.set_num_threads(1)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sft, grpo in ((4, 3), (4, 13), (14, 3)):
            cfg = load_config(None, [
                f"name=count-{sft}-{grpo}", "model.size=nano", "task.digits=1", "task.eval_percent=30",
                f"sft.steps={sft}", "sft.target_accuracy=1.0", f"grpo.steps={grpo}", "grpo.prompts_per_step=2",
                "grpo.num_generations=2", "grpo.max_new_tokens=3", "grpo.verify_max_new_tokens=12",
                "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=3", "eval.verify_max_new_tokens=12",
                f"output_dir={tmp}/out-{sft}-{grpo}", f"tracking.root={tmp}/mlruns"])
            run_id = run_experiment(cfg, Quiet(), resume=False).run_id
            with sqlite3.connect(Path(tmp) / "mlruns" / "mlflow.db") as conn:
                counts[sft, grpo] = conn.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?",
                                                 (run_id,)).fetchone()[0]
    return {"per_grpo_step": (counts[4, 13] - counts[4, 3]) / 10, "per_sft_step": (counts[14, 3] - counts[4, 3]) / 10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = []
    for i in range(args.repeats):
        r = one(args.runs, seed=i)
        results.append(r)
        print(f"{args.runs} runs: {r['file_bytes'] / 1e6:.2f} MB (empty store {r['empty_bytes'] / 1e6:.2f} MB), "
              f"written in {r['write_seconds']:.1f} s, all read back in {r['read_all_seconds']:.2f} s", flush=True)
    per_1000 = 1000 / args.runs
    grown = statistics.median(r["file_bytes"] - r["empty_bytes"] for r in results)
    history = metric_history_bytes()
    print(f"metric history: {history:.0f} bytes per logged value", flush=True)
    per_step = values_per_step()
    # experiments/addition.toml: 250 GRPO steps after up to 800 SFT steps (SFT stops at its target accuracy)
    addition = [250 * per_step["per_grpo_step"], 250 * per_step["per_grpo_step"] + 800 * per_step["per_sft_step"]]
    print(f"logged values per step: {per_step}; an addition.toml run: {addition[0]:.0f}-{addition[1]:.0f} values",
          flush=True)
    summary = {
        "benchmark": "store_size",
        "store": "SQLite (the embedded default store, WAL journal checkpointed before measuring)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, 2 CPU cores (shared with other jobs)",
        "mlflow": mlflow.__version__,
        "runs": args.runs,
        "per_run": "7-8 metrics with one value each, 5 params, about 10 tags; artifacts are files beside the store",
        "repeats": results,
        "empty_store_mb": round(statistics.median(r["empty_bytes"] for r in results) / 1e6, 2),
        "mb_per_1000_runs": round(grown * per_1000 / 1e6, 2),
        "kb_per_run": round(grown / args.runs / 1e3, 2),
        "write_seconds_per_1000_runs": round(statistics.median(r["write_seconds"] for r in results) * per_1000, 1),
        "read_all_seconds_per_1000_runs": round(statistics.median(r["read_all_seconds"] for r in results)
                                                * per_1000, 2),
        "bytes_per_logged_metric_value": round(history),
        "logged_values_per_step": per_step,
        "addition_toml_run_logged_values": [round(v) for v in addition],
        "addition_toml_run_mb": [round(v * history / 1e6, 1) for v in addition],
        "addition_toml_gb_per_1000_runs": [round(v * history / 1e6, 1) for v in addition],
    }
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['mb_per_1000_runs']} MB and {summary['write_seconds_per_1000_runs']} s to write per 1,000 runs "
          f"-> {OUT}")


if __name__ == "__main__":
    main()
