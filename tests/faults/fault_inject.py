"""Run the `rlscale` CLI with a SIGKILL injected at a chosen point (used by test_kills.py; test code only).

Usage: python fault_inject.py POINT N [rlscale args...]

POINT (N counts hits of that point in this process, the kill comes at the Nth):
  generate    in the middle of the Nth GRPO sampling call (inside its decode loop)
  backward    inside the autograd engine, during the Nth `Tensor.backward`
  checkpoint  during the Nth checkpoint write: `state.pt` half written in the checkpoint's temp folder
  flush       during the Nth metric `log_batch`: after the metric rows are inserted, before the commit
  slow        no kill: each GRPO sampling call sleeps N milliseconds (the test kills at a random time)
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, n: int) -> None:
    hits = 0

    def nth() -> bool:
        nonlocal hits
        hits += 1
        return hits == n

    if point in ("generate", "slow"):
        import torch

        from rlscale.rl import grpo as rl_grpo
        original, searchsorted = rl_grpo.sample, torch.searchsorted
        armed = False

        def killing_searchsorted(*args, **kwargs):
            if armed:
                die()
            return searchsorted(*args, **kwargs)

        def sample(*args, **kwargs):
            nonlocal armed
            if point == "slow":
                time.sleep(n / 1000)
            elif nth():
                armed = True  # the next sampled token kills: prefill done, decoding under way
            return original(*args, **kwargs)

        rl_grpo.sample = sample
        torch.searchsorted = killing_searchsorted
    elif point == "backward":
        import torch

        original = torch.Tensor.backward

        def backward(self, *args, **kwargs):
            if nth():
                self.register_hook(lambda grad: die())  # runs inside the engine, mid-backward
            return original(self, *args, **kwargs)

        torch.Tensor.backward = backward
    elif point == "checkpoint":
        import torch

        original = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).parent.name.startswith(".ckpt-") and nth():
                buf = io.BytesIO()
                original(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(f, "wb") as fh:  # a torn write: half the file on disk, then the process dies
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
            return original(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "flush":
        from mlflow.tracking import MlflowClient
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        original = MlflowClient.log_batch
        armed = False

        def log_batch(self, run_id, metrics=(), *args, **kwargs):
            nonlocal armed
            if metrics and nth():
                armed = True
            return original(self, run_id, metrics, *args, **kwargs)

        def after_execute(conn, cursor, statement, parameters, context, executemany):
            if armed and statement.lstrip().upper().startswith("INSERT INTO METRICS"):
                die()  # the transaction holds the new rows, uncommitted

        MlflowClient.log_batch = log_batch
        event.listen(Engine, "after_cursor_execute", after_execute)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["rlscale", *sys.argv[3:]]
    from rlscale.experiments.cli import main

    main()
