"""One training run in MLflow: tags, flattened params, batched metrics with cost and heartbeat, and its fate."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from tracking.cost import cost_usd, load_prices
from tracking.energy import GpuEnergy

DEFAULT_ROOT = Path("mlruns")
SECRET_WORDS = ("token", "password", "secret", "key")


def tracking_uri(uri: str | None = None, root: Path = DEFAULT_ROOT) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store `<root>/mlflow.db`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def experiment_id(client: MlflowClient, name: str, root: Path = DEFAULT_ROOT) -> str:
    """The id of experiment `name`, created (artifacts under `<root>/artifacts/`) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "experiment"  # no '/', no '..'
        artifacts = (root / "artifacts" / folder).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'}, with values of secret-looking keys masked."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            secret = any(w in k.lower() for w in SECRET_WORDS) and v not in (None, "")
            out[key] = "***" if secret else str(v)[:6000]
    return out


def git_info() -> tuple[str, str]:
    """(commit, 'true'/'false' dirty) of the working tree, or ('unknown', 'unknown')."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
        return commit or "unknown", "true" if dirty.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


class TrackedRun:
    """A trainer callback that writes to one MLflow run; use as a context manager to record its fate.

    Metrics are buffered and sent with `log_batch` at most every `flush_seconds` (and at the end), together
    with `cost/usd` (from `compute/device_seconds` and the price table), a `heartbeat` timestamp and, where
    NVML reads the GPUs in `gpus`, cumulative `energy/gpu_kwh`. `system_metrics` starts MLflow's own
    sampler of CPU, memory, disk, network and GPU use (`system/*`). An exception of a `pruned_on` type (an
    Optuna trial pruned) ends the run KILLED with the tag `pruned=true`."""

    def __init__(self, client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str],
                 params: dict[str, str], device: str, prices: dict[str, float] | None = None,
                 flush_seconds: float = 10.0, root: Path = DEFAULT_ROOT, resume_run_id: str | None = None,
                 gpus: list[int] | None = None, system_metrics: bool = False,
                 pruned_on: tuple[type[BaseException], ...] = ()):
        self.client = client
        self.device = device
        self.pruned_on = pruned_on  # exceptions that mean "stopped early on purpose": KILLED, tagged pruned
        self.prices = prices or load_prices()
        self.flush_seconds = flush_seconds
        commit, dirty = git_info()
        all_tags = {"project": experiment, "host": socket.gethostname(), "git.commit": commit,
                    "git.dirty": dirty, "python": platform.python_version(), "device.price_key": device} | tags
        if resume_run_id:  # a resumed training continues its own run: cumulative metrics carry on from the checkpoint
            self.run_id = resume_run_id
            client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            client.set_tag(resume_run_id, "resumed", "true")
        else:
            run = client.create_run(experiment_id(client, experiment, root), tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self.last: dict[str, float] = {}
        self.energy = GpuEnergy(gpus or [])
        self._energy_before = 0.0  # energy of the run's earlier attempts, when resumed
        if resume_run_id and self.energy.available:
            self._energy_before = client.get_run(resume_run_id).data.metrics.get("energy/gpu_kwh", 0.0)
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=bool(resume_run_id),
                                                tracking_uri=client.tracking_uri)
            self.monitor.start()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        if "compute/device_seconds" in metrics:
            metrics = metrics | {"cost/usd": cost_usd(metrics["compute/device_seconds"], self.device, self.prices)}
        metrics = metrics | {"heartbeat": now / 1000.0}
        if (kwh := self.energy.kwh()) is not None:
            metrics["energy/gpu_kwh"] = self._energy_before + kwh
        self.last |= metrics
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # NaN dropped
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics (1000 per call, MLflow's batch limit)."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.monitor is not None:
            self.monitor.finish()
        self.flush()
        if exc_type is None:
            status = RunStatus.to_string(RunStatus.FINISHED)
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.to_string(RunStatus.KILLED)
        elif self.pruned_on and issubclass(exc_type, self.pruned_on):
            status = RunStatus.to_string(RunStatus.KILLED)
            self.client.set_tag(self.run_id, "pruned", "true")
        else:
            status = RunStatus.to_string(RunStatus.FAILED)
            self.client.log_batch(self.run_id, tags=[RunTag("error.class", exc_type.__name__),
                                                     RunTag("error.message", str(exc)[:5000])])
        self.client.set_terminated(self.run_id, status=status)
        return False
