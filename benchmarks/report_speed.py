"""Report speed over two stores of 1000 fake runs each (written by fake_runs.py when missing), target 30 s each.

    python benchmarks/report_speed.py [--runs 1000] [--recipes 4] [--store DB] [--recipe-store DB]

fake_runs: build_report in the process over runs of every fate with one value a metric (load, cost, fits with 200
bootstrap resamples each, plots, files, the MLflow report run). recipe_runs: `rlscale report` end to end, a new
process (imports, load, every run's eval history read in bulk, per-recipe fits with the bootstrap sized for the
store, plots, files, the MLflow report run), over runs that each have a `recipe` tag (--recipes recipes) and an
eval history of fake_runs.EVALS points. The stores (several MB, default under $TMPDIR/rlscale-report-speed/) are
kept outside the repository and reused (delete one to write it again); each timing reads a copy, since the report
run is logged to the store. Writes benchmarks/results/report_speed.json, one entry a case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.fake_runs import EVALS, write_fake_runs  # noqa: E402
from rlscale.analysis.report import build_report  # noqa: E402

TARGET_SECONDS = 30.0
STORES = Path(tempfile.gettempdir()) / "rlscale-report-speed"


def _store(path: Path, runs: int, recipes: int = 0) -> float | None:
    """Write the fake store at `path` unless it is there; the seconds writing took (None when reused)."""
    if path.is_file():
        return None
    t0 = time.perf_counter()
    write_fake_runs(path, runs, recipes=recipes)
    seconds = time.perf_counter() - t0
    print(f"wrote {runs} fake runs{f' of {recipes} recipes' if recipes else ''} to {path} in {seconds:.1f} s")
    return round(seconds, 1)


def _copy(store: Path, root: Path) -> str:
    """A copy of the SQLite store as `<root>/mlflow.db` (a file copy would miss runs still in the write-ahead log);
    its tracking URI."""
    root.mkdir(parents=True)
    src, dst = sqlite3.connect(store), sqlite3.connect(root / "mlflow.db")
    src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{root / 'mlflow.db'}"


def fake_runs_case(store: Path, runs: int) -> dict:
    """build_report in this process over runs of every fate."""
    written = _store(store, runs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mlruns"
        uri = _copy(store, root)
        t0 = time.perf_counter()
        result = build_report(uri, None, None, None, Path(tmp) / "report", root=root)
        seconds = time.perf_counter() - t0
    return {
        "what": "build_report in the process; runs of every fate, one value a metric",
        "runs": sum(result.cost["runs"].values()),
        "score_points": result.fits["n_points"],
        "forms_fitted": list(result.fits["forms"]),
        "store_written_seconds": written,
        "seconds": round(seconds, 2),
    }


def recipe_runs_case(store: Path, runs: int, recipes: int) -> dict:
    """`rlscale report` as a new process over recipe runs with eval histories."""
    written = _store(store, runs, recipes)
    with tempfile.TemporaryDirectory() as tmp:
        uri = _copy(store, Path(tmp) / "mlruns")  # the report run's artifacts go under ./mlruns: tmp is the cwd
        command = [sys.executable, "-m", "rlscale.experiments.cli", "report", "--uri", uri, "--out", "report"]
        t0 = time.perf_counter()
        subprocess.run(command, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        fits = json.loads((Path(tmp) / "report" / "fits.json").read_text())
    return {
        "what": f"rlscale report end to end (a new process); runs with a recipe tag and {EVALS} evals each",
        "runs": runs,
        "recipes": recipes,
        "evals_per_run": EVALS,
        "recipes_fitted": len(fits["recipes"]),
        "score_points": fits["n_points"],
        "bootstrap_resamples": fits["bootstrap"]["resamples"],
        "store_written_seconds": written,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(STORES / "mlflow.db"), help="fake_runs case's store")
    ap.add_argument("--recipe-store", default=str(STORES / "recipes.db"), help="recipe_runs case's store")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--recipes", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/report_speed.json")
    args = ap.parse_args()
    cases = {
        "fake_runs": fake_runs_case(Path(args.store), args.runs),
        "recipe_runs": recipe_runs_case(Path(args.recipe_store), args.runs, args.recipes),
    }
    for case in cases.values():
        case["within_target"] = case["seconds"] < TARGET_SECONDS
    record = {
        "benchmark": "report_speed",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} threads",
        "python": platform.python_version(),
        "mlflow": version("mlflow"),
        "store": "sqlite (embedded)",
        "target_seconds": TARGET_SECONDS,
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    slow = [f"{name} {case['seconds']:.1f} s" for name, case in cases.items() if not case["within_target"]]
    if slow:
        raise SystemExit(f"over the {TARGET_SECONDS:g} s target: {', '.join(slow)}")


if __name__ == "__main__":
    main()
