"""Shared cold-start SFT: each distinct SFT is trained once, as its own MLflow run, and every RL run that needs it
starts from its model.

An SFT is keyed by everything that determines it (`sft_key`): the base model and its files' digest, the task and
its data files' digest, the SFT and eval configs, the seed and the SFT code path. The store is the lock: a worker
that needs a key claims it by creating the run (tags `phase=sft`, `sft.key`, its host and pid); when two claim at
once, the earliest run trains and the others delete their empty claim and wait. Only a FINISHED run is reused (its
model is logged with it as the artifact `sft/`, so any machine on the same server can fetch it); a claim whose
process is gone (same host: no such pid; other host: no heartbeat for STALE_SECONDS) is marked KILLED, billed for
what it did, and never reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from rlscale.experiments.config import ExperimentConfig
from rlscale.rl.checkpoint import owned, publish
from rlscale.rl.model import resolve_path

log = logging.getLogger(__name__)

HOST = socket.gethostname()
RL_DIR = Path(__file__).resolve().parent.parent / "rl"
SFT_CODE = ("sft.py", "self_verify.py", "chat.py", "generate.py", "model.py", "tasks")  # what an SFT result runs
NOT_SFT = {"model": {"device", "pretrain_tokens", "pretrain_flops", "pretrain_usd", "pretrain_source"},
           "sft": {"reuse", "checkpoint_every"}}  # fields that do not change the SFT's model or its eval
STALE_SECONDS = 600.0  # a claim from another host with no heartbeat for this long is taken for dead
POLL_SECONDS = 2.0
SETTLE_SECONDS = 1.0  # after claiming, wait this long for a concurrent claim to land before comparing
_digests: dict[tuple[str, int, int], str] = {}


@dataclass
class WarmStart:
    """The SFT a run starts from: its run, key, local model folder and how long this worker waited for it."""

    run_id: str
    key: str
    folder: Path
    metrics: dict[str, float]  # the SFT run's: its compute and cost are the RL run's ancestors'
    waited_seconds: float = 0.0


def _digest_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    if path.is_file():
        return _digest_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{_digest_file(f)}\0".encode())
    return h.hexdigest()


def code_digest() -> str:
    """sha256 of the SFT code path's sources (rl/sft.py, its examples, prompts, tasks, model loading)."""
    h = hashlib.sha256(version("rlscale").encode())
    for name in SFT_CODE:
        path = RL_DIR / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f"{f.relative_to(RL_DIR)}\0".encode() + f.read_bytes())
    return h.hexdigest()


def sft_key(cfg: ExperimentConfig) -> str:
    """The content address of the run's SFT: a hash of everything that determines its model and its eval."""
    data = cfg.model_dump(mode="json", include={"seed", "model", "task", "sft", "eval"}, exclude=NOT_SFT)
    files = {}
    if cfg.model.path:
        files["model.path"] = digest(resolve_path(cfg.model.path))
    for name in ("path", "eval_path"):
        if getattr(cfg.task, name, None):
            files[f"task.{name}"] = digest(Path(getattr(cfg.task, name)))
    data |= {"files": files, "code": code_digest()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def claims(client: MlflowClient, experiment_id: str, key: str) -> list[Run]:
    """The runs of the experiment holding SFT `key`, oldest first (then by run id)."""
    runs = client.search_runs([experiment_id], f"tags.`sft.key` = '{key}' and tags.phase = 'sft'", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def alive(client: MlflowClient, run: Run) -> bool:
    """Whether a RUNNING claim's trainer still lives: its pid on this host, else a recent heartbeat."""
    tags = run.data.tags
    if tags.get("sft.host") == HOST:
        if tags.get("sft.pid") == str(os.getpid()):  # this process's own, and it is not training it now
            return False
        try:
            os.kill(int(tags.get("sft.pid", "0")), 0)
        except (OSError, ValueError):
            return False
        return True
    beat = run.data.metrics.get("heartbeat", run.info.start_time / 1000.0)
    return time.time() - beat < STALE_SECONDS


def claim(client: MlflowClient, experiment_id: str, key: str, run_name: str) -> str | None:
    """Create the run that will train SFT `key`; None (the claim deleted) when an earlier live claim exists."""
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"phase": "sft", "sft.key": key, "sft.host": HOST, "sft.pid": str(os.getpid())})
    time.sleep(SETTLE_SECONDS)
    live = [r for r in claims(client, experiment_id, key)
            if r.info.status == "RUNNING" and (r.info.run_id == run.info.run_id or alive(client, r))]
    if live[0].info.run_id != run.info.run_id:
        client.delete_run(run.info.run_id)  # empty: nothing trained, nothing billed
        return None
    return run.info.run_id


def abandon(client: MlflowClient, run_id: str) -> None:
    """End a claim whose training raised before its run took over (a claim left RUNNING would be waited for)."""
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception as e:  # the store is down: the claim's pid is gone by the time anyone looks
        log.warning("could not end the SFT claim %s: %s", run_id, e)


def find(client: MlflowClient, experiment_id: str, key: str) -> tuple[Run | None, Run | None]:
    """(the finished run of SFT `key`, a live claim training it), either None; dead claims are marked KILLED."""
    live = None
    for r in claims(client, experiment_id, key):
        if r.info.status == "FINISHED":
            return r, None
        if r.info.status == "RUNNING":
            if alive(client, r):
                live = live or r
            else:  # its process is gone (SIGKILL, a lost machine): billed as killed, never reused
                log.warning("SFT run %s (host %s, pid %s) is gone: marked KILLED", r.info.run_id,
                            r.data.tags.get("sft.host"), r.data.tags.get("sft.pid"))
                client.set_tag(r.info.run_id, "reconciled", "true")
                client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return None, live


def work_dir(root: Path, key: str, run_id: str) -> Path:
    """Where the SFT run `run_id` of `key` trains, and where its model is found on this machine."""
    return root / "warmstarts" / key / run_id


def local_model(client: MlflowClient, root: Path, run: Run) -> Path:
    """The finished SFT run's model folder on this disk: where it was trained, else fetched once from its
    artifacts (under a lock: concurrent workers fetch it once)."""
    folder = work_dir(root, run.data.tags["sft.key"], run.info.run_id) / "sft"
    if owned(folder, "model"):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not owned(folder, "model"):
            tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
            try:
                client.download_artifacts(run.info.run_id, "sft", str(tmp))
                publish(tmp / "sft", folder, "model", run_id=run.info.run_id)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
