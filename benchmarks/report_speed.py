"""Report speed: build_report over a store of 1000 fake runs (written by fake_runs.py when the store is missing).

    python benchmarks/report_speed.py [--store $TMPDIR/rlscale-report-speed/mlflow.db] [--runs 1000]

Writes benchmarks/results/report_speed.json; the store (several MB) is kept outside the repository and reused.
Target: the whole report (load, cost, fits with 200 bootstrap resamples each, plots, files, the MLflow report run)
in under 30 s. The report run is logged to a copy of the store, so every timing reads the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.fake_runs import write_fake_runs  # noqa: E402
from rlscale.analysis.report import build_report  # noqa: E402

TARGET_SECONDS = 30.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "rlscale-report-speed", "mlflow.db"))
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/report_speed.json")
    args = ap.parse_args()
    store = Path(args.store)
    if not store.is_file():
        t0 = time.perf_counter()
        write_fake_runs(store, args.runs)
        print(f"wrote {args.runs} fake runs to {store} in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mlruns"
        root.mkdir()
        src, dst = sqlite3.connect(store), sqlite3.connect(root / "mlflow.db")
        src.backup(dst)  # a file copy would miss runs still in the write-ahead log
        src.close()
        dst.close()
        t0 = time.perf_counter()
        result = build_report(f"sqlite:///{root / 'mlflow.db'}", None, None, None, Path(tmp) / "report", root=root)
        seconds = time.perf_counter() - t0
    runs = sum(result.cost["runs"].values())
    record = {
        "benchmark": "report_speed",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} threads",
        "python": platform.python_version(),
        "mlflow": version("mlflow"),
        "store": "sqlite (embedded)",
        "runs": runs,
        "score_points": result.fits["n_points"],
        "forms_fitted": list(result.fits["forms"]),
        "seconds": round(seconds, 2),
        "target_seconds": TARGET_SECONDS,
        "within_target": seconds < TARGET_SECONDS,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if seconds >= TARGET_SECONDS:
        raise SystemExit(f"report over {runs} runs took {seconds:.1f} s, over the {TARGET_SECONDS:g} s target")


if __name__ == "__main__":
    main()
