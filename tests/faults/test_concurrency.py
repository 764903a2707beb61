"""Four processes write runs to one new embedded SQLite store at once: no 'database is locked', nothing lost.

They start together on a store that does not exist yet (so they race to create its tables and the
experiment), then each sends a metric batch per step through TrackedRun (flush every call).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from rlscale.tracking.run import tracking_uri

WRITER = Path(__file__).with_name("fault_writer.py")
WORKERS = 4
BATCHES = 100


def test_four_writers_share_the_sqlite_store(tmp_path):
    root = tmp_path / "mlruns"
    env = os.environ | {"MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WRITER), str(root), "shared", str(w), str(BATCHES)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for w in range(WORKERS)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        assert "database is locked" not in out and "Traceback" not in out, out
    run_ids = [out.strip().splitlines()[-1] for out in outputs]

    con = sqlite3.connect(root / "mlflow.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    client = MlflowClient(tracking_uri(None, root))
    exps = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(exps) == 1  # created once, though all four asked for it at the same time
    runs = {r.info.run_id: r for r in client.search_runs([exps[0].experiment_id])}
    assert set(runs) == set(run_ids)
    for w, run_id in enumerate(run_ids):
        assert runs[run_id].info.status == "FINISHED"
        history = client.get_metric_history(run_id, f"w{w}/value")
        assert sorted((m.step, m.value) for m in history) == [(b, float(b)) for b in range(BATCHES)]
        assert len(client.get_metric_history(run_id, "heartbeat")) == BATCHES
        assert runs[run_id].data.metrics["cost/usd"] == (BATCHES - 1) / 3600 * 0.05
