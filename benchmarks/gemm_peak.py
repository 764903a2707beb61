"""This CPU's GEMM peak: the rate of square matmuls with torch in fp32 and bf16 on 1 and 2 threads, by size; the
measured peak a CPU run's MFU is taken against (tracking/peak.py). Run by hand, on a quiet machine.

    python benchmarks/gemm_peak.py [--rounds 3] [--out benchmarks/results/gemm_peak.json]

Each size is timed `--rounds` times (each about 0.3 s: a warm-up, then the fastest of at least two matmuls); the
best and the median round are kept. The load average before and after is recorded: another process on the cores
lowers these numbers, most of all with 2 threads.
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

from rlscale.experiments.runner import device_name
from rlscale.rl.accounting import cpu_devices
from rlscale.tracking.peak import DTYPES, gemm_flops

SIZES = (256, 512, 1024, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="benchmarks/results/gemm_peak.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        vcpus = float(cpu_devices(threads, share=0.0))  # what these threads hold alone
        for dtype in ("float32", "bfloat16"):
            by_size = {}
            for n in SIZES:
                rates = [gemm_flops(DTYPES[dtype], seconds=0.3, sizes=(n,))[0] for _ in range(args.rounds)]
                by_size[str(n)] = {"best_gflops": round(max(rates) / 1e9, 1),
                                   "median_gflops": round(statistics.median(rates) / 1e9, 1)}
            best_n, best = max(by_size.items(), key=lambda kv: kv[1]["best_gflops"])
            results.append({"threads": threads, "vcpus": vcpus, "dtype": dtype, "by_size": by_size,
                            "peak_gflops": best["best_gflops"], "peak_n": int(best_n),
                            "peak_gflops_per_vcpu": round(best["best_gflops"] / vcpus, 1)})
            print(f"{threads} threads {dtype}: peak {best['best_gflops']} GFLOP/s at n={best_n}", flush=True)
    result = {
        "benchmark": "gemm_peak",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": args.rounds,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": (f"provisional: load average {load_before[0]:.2f} on {os.cpu_count()} CPUs before the run, other work "
                 "shared the cores" if load_before[0] > 0.25 * (os.cpu_count() or 1) else "quiet machine"),
        "results": results,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
