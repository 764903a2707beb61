"""A worker for the concurrency test: one tracked run logging `n` metric batches to a shared store.

Usage: python fault_writer.py ROOT EXPERIMENT WORKER N
Each batch b logs `w{worker}/value` = b at step b (plus TrackedRun's heartbeat); prints the run id.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlflow.tracking import MlflowClient  # noqa: E402

from rlscale.tracking.run import TrackedRun, tracking_uri  # noqa: E402


def main() -> None:
    root, experiment, worker, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = MlflowClient(tracking_uri(None, root))
    with TrackedRun(client, experiment, f"writer-{worker}", {"worker": str(worker)}, {"n": str(n)}, "cpu_core",
                    prices={"cpu_core": 0.05}, flush_seconds=1e-6, root=root) as run:
        for b in range(n):
            run.on_log(b, {f"w{worker}/value": float(b), "compute/device_seconds": float(b)})
    print(run.run_id, flush=True)


if __name__ == "__main__":
    main()
