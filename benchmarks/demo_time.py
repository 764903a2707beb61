"""The README's main job (`make demo`: grid, sweep, final run, report) timed with the shared SFT warm start and
without it (`--set sft.reuse=false`, every run trains its own SFT); run by hand, on a quiet machine.

    python benchmarks/demo_time.py [--out benchmarks/results/demo_time.json]

Each variant runs the Makefile's commands on experiments/demo.toml in its own folder under outputs/bench-demo/
(its own store), then reads back the runs: how many SFTs were trained, total FLOPs and device-seconds, the final
run's accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pruners import clear  # benchmarks/ is the script's folder: on sys.path

from rlscale.analysis.runs import load_runs

RLSCALE = [sys.executable, "-m", "rlscale.experiments.cli"]
OWN = ("demo.toml", "out", "mlruns", "report")  # what one variant writes into its folder


def steps(config: Path, folder: Path, extra: list[str]) -> list[tuple[str, list[str]]]:
    """The Makefile's main job for `config`, recorded in `folder`."""
    sets = [a for s in extra for a in ("--set", s)]
    return [("grid", [*RLSCALE, "grid", str(config), *sets]),
            ("sweep", [*RLSCALE, "sweep", str(config), "--workers", "2", *sets]),
            ("final", [*RLSCALE, "train", str(config), "--from-sweep", "demo-sweep", "--set", "tracking.phase=final",
                       "--set", f"output_dir={folder}/out/final", *sets]),
            ("report", [*RLSCALE, "report", "--experiment", "demo", "--uri", f"sqlite:///{folder}/mlruns/mlflow.db",
                        "--out", str(folder / "report")])]


def variant(name: str, root: Path, extra: list[str]) -> dict:
    folder = root / name
    clear(folder, OWN)  # only what this benchmark writes; a folder holding anything else (or a link) is refused
    folder.mkdir(parents=True, exist_ok=True)
    text = Path("experiments/demo.toml").read_text().replace('output_dir = "outputs/demo"',
                                                              f'output_dir = "{folder}/out"')
    config = folder / "demo.toml"
    config.write_text(text + f'\n[tracking]\nroot = "{folder}/mlruns"\n')
    walls = {}
    for label, cmd in steps(config, folder, extra):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        walls[label] = round(time.perf_counter() - start, 1)
        print(f"{name} {label}: {walls[label]:.0f} s", flush=True)
    runs = load_runs(None, ["demo"], root=folder / "mlruns")
    phase = runs["tags.phase"].fillna("")
    final = runs[phase == "final"].iloc[0]
    return {"wall_seconds": walls, "main_job_seconds": round(sum(v for k, v in walls.items() if k != "report"), 1),
            "runs": len(runs), "sft_runs": int((phase == "sft").sum()),
            "sft_trained": int((runs["compute/flops/sft"].fillna(0) > 0).sum()),
            "compute_flops": float(runs["compute/flops"].sum()),
            "device_seconds": float(runs["compute/device_seconds"].sum()),
            "final_accuracy": float(final["eval/accuracy"]),
            "final_learning_rate": float(final["params.grpo.learning_rate"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="outputs/bench-demo")
    parser.add_argument("--out", default="benchmarks/results/demo_time.json")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    results = {"own_sft": variant("own_sft", root, ["sft.reuse=false"]), "shared_sft": variant("shared_sft", root, [])}
    before, after = results["own_sft"], results["shared_sft"]
    out = {"benchmark": "demo_time", "config": "experiments/demo.toml", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "variants": results,
           "main_job_saved_pct": round(100 * (1 - after["main_job_seconds"] / before["main_job_seconds"]), 1),
           "flops_saved_pct": round(100 * (1 - after["compute_flops"] / before["compute_flops"]), 1)}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "variants"}, indent=2))


if __name__ == "__main__":
    main()
