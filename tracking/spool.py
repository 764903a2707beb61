"""A local spool of what a run could not deliver to its tracking store, and `sync_spool` to deliver it later.

When the store (an MLflow server, a locked or unreachable database) is still down at the end of a run, its
pending metrics, tags, small artifacts and final status are appended to `<spool dir>/<run_id>.jsonl` (default
`<tracking root>/spool/`): one JSON object per line, written with a single `write` and fsynced, so a crash can
at most leave a torn last line, which is ignored. The first line names the run and its tracking URI:

    {"kind": "run", "run_id": "...", "tracking_uri": "http://...", "created": 1.7e9}
    {"kind": "metrics", "metrics": [["compute/flops", 1.0e12, 1712345678000, 3], ...]}   # key, value, ms, step
    {"kind": "tags", "tags": {"error.class": "RuntimeError", ...}}
    {"kind": "dict", "artifact_file": "eval_samples.json", "data": {...}}
    {"kind": "artifacts", "local_dir": "/abs/outputs/run/final", "artifact_path": "model"}
    {"kind": "dataset", "context": "eval", "dataset": {"name": ..., "digest": ..., "source_type": ..., ...}}
    {"kind": "logged_model", "name": "model", "local_dir": "/abs/outputs/run/final", "metrics": {...}, ...}
    {"kind": "status", "status": "FINISHED", "end_time": 1712345679000}

`sync_spool` (`rlscale runs sync`) replays each file in order and deletes it only after every record was
accepted. Replaying is idempotent (MLflow drops a metric identical to one it holds; tags, artifacts, datasets and
the status are overwritten; a LoggedModel the run already has is not made again), so a sync that is interrupted
can simply be run again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on POSIX: no cross-process lock (one writer per spool file is still the rule)
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".jsonl"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def default_spool_dir(root: str | Path) -> Path:
    """`<tracking root>/spool`."""
    return Path(root) / "spool"


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    """An fd of `path` (created when missing) opened for appending, under an exclusive lock.

    The lock is taken on the file itself; after locking, the path is checked to still name the same file (a
    sync may have delivered and removed it meanwhile), else it is opened again. A symbolic link is refused."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link(path, "nothing was written through it") from None
            raise
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)  # closing releases the lock


def _link(path: Path, outcome: str = "nothing of this spool file was delivered") -> ValueError:
    return ValueError(f"{path} is a symbolic link: refused ({outcome})")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """The spool file of one run: append records durably."""

    def __init__(self, directory: str | Path, run_id: str, tracking_uri: str):
        self.directory = Path(directory)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.path = self.directory / f"{run_id}{SUFFIX}"

    def append(self, records: list[dict[str, Any]]) -> Path:
        """Append records (JSON-serialisable dicts with a `kind`), fsynced; the header line comes first. A record's
        folder (`local_dir`: an artifact folder, a model) is copied under `<spool dir>/<run_id>/` first: a sync
        uploads nothing from anywhere else."""
        if not records:
            return self.path
        self.directory.mkdir(parents=True, exist_ok=True)
        records = [self._keep_files(r) for r in records]
        with _locked(self.path) as fd:
            lines = []
            if os.fstat(fd).st_size == 0:
                lines.append({"kind": "run", "run_id": self.run_id, "tracking_uri": self.tracking_uri,
                              "created": time.time()})
            lines += records
            data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines).encode()
            view = memoryview(data)
            while view:  # one write is the rule; loop only for a short write
                view = view[os.write(fd, view):]
            os.fsync(fd)
        _fsync_dir(self.directory)
        return self.path


    def _keep_files(self, record: dict[str, Any]) -> dict[str, Any]:
        if "local_dir" not in record or not Path(record["local_dir"]).is_dir():
            return record
        home = self.directory / self.run_id
        if home.is_symlink():  # planted: the run's files would land wherever it points
            raise _link(home, "nothing was written through it")
        home.mkdir(exist_ok=True)
        copy = Path(tempfile.mkdtemp(prefix=f"{record['kind']}-", dir=home))
        shutil.copytree(record["local_dir"], copy, dirs_exist_ok=True)
        return record | {"local_dir": str(copy.resolve())}


def read_spool(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records) of a spool file; a torn last line (a crash mid-write) is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    if not records or records[0].get("kind") != "run" or "run_id" not in records[0]:
        raise ValueError(f"{path}: not a spool file (no run header)")
    return records[0], records[1:]


@dataclass
class SyncResult:
    """What `sync_spool` did: run ids delivered, and files left with the reason."""

    synced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # file -> error
    metrics: int = 0  # metric values delivered


def deliver(client, run_id: str, record: dict[str, Any]) -> int:
    """Send one spool record to the store (the same records a live run sends when the store is back)."""
    from mlflow.entities import Metric, RunTag

    kind = record.get("kind")
    if kind == "metrics":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        return len(metrics)
    if kind == "tags":
        tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
        for i in range(0, len(tags), 100):
            client.log_batch(run_id, tags=tags[i : i + 100])
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["artifact_file"])
    elif kind == "artifacts":
        if Path(record["local_dir"]).is_dir():
            client.log_artifacts(run_id, record["local_dir"], record.get("artifact_path"))
    elif kind == "dataset":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        tags = [InputTag("mlflow.data.context", record["context"])]
        inputs = [DatasetInput(Dataset(**record["dataset"]), tags)]
        try:
            client.log_inputs(run_id, inputs)
        except MlflowException as e:  # two runs of one experiment created the same dataset row at once: it
            if not _duplicate_row(e):  # exists now, and logging again links this run to it
                raise
            client.log_inputs(run_id, inputs)
    elif kind == "logged_model":
        _deliver_model(client, run_id, record)
    elif kind == "status":
        run = client.get_run(run_id)
        if "reconciled" in run.data.tags:  # marked KILLED while the run was in fact ending: the spool knows
            client.delete_tag(run_id, "reconciled")
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown spool record kind {kind!r}")
    return 0


def _duplicate_row(e: Exception) -> bool:
    """A unique-key violation from the store's database (PostgreSQL, MySQL or SQLite wording)."""
    message = str(e).lower()
    return any(m in message for m in ("uniqueviolation", "duplicate key", "unique constraint failed",
                                      "duplicate entry"))


def _deliver_model(client, run_id: str, record: dict[str, Any]) -> None:
    """The run's final model as an MLflow LoggedModel: its files, linked to the run as an output at `step`, with
    the run's held-out metrics linked to it and to the eval dataset."""
    from mlflow.entities import LoggedModelOutput, Metric

    if not Path(record["local_dir"]).is_dir():
        return
    exp_id = client.get_run(run_id).info.experiment_id
    done = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
    if any(m.name == record["name"] and str(m.status) == "READY" for m in done):
        return
    model = client.create_logged_model(exp_id, record["name"], source_run_id=run_id, params=record.get("params"),
                                       tags=record.get("tags"))
    client.log_model_artifacts(model.model_id, record["local_dir"])
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(record["step"]))])
    ds = record.get("dataset") or {}
    metrics = [Metric(k, float(v), int(record["timestamp"]), int(record["step"]), model_id=model.model_id,
                      dataset_name=ds.get("name"), dataset_digest=ds.get("digest"), run_id=run_id)
               for k, v in record["metrics"].items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def sync_file(path: str | Path, uri: str, client_factory: Callable[[str], Any] | None = None,
              named: bool = True) -> int:
    """Deliver one spool file to the store `uri` and delete it; returns the number of metric values delivered.

    A spool file is data, not instructions: unless the user `named` the store, a file written for another store is
    refused (it would choose where the run goes); nothing but the regular files under `<spool dir>/<run_id>/` is
    ever uploaded, and a symbolic link (the spool file, the run folder or anything in it) refuses the whole file.
    Raises on the first record refused; the file is then kept whole."""
    path = Path(path)
    if client_factory is None:
        from mlflow.tracking import MlflowClient

        client_factory = MlflowClient
    if path.is_symlink():
        raise _link(path)
    if not path.is_file():
        return 0
    with _locked(path) as fd:  # no run appends while its spool is delivered
        if os.fstat(fd).st_size == 0:  # created by the lock itself: nothing to deliver
            path.unlink()
            return 0
        header, records = read_spool(path)
        _check_spool(path, header, records, uri, named)
        client = client_factory(uri)
        delivered = sum(deliver(client, header["run_id"], r) for r in records)
        path.unlink()
    _fsync_dir(path.parent)
    return delivered


def _check_spool(path: Path, header: dict[str, Any], records: list[dict[str, Any]], uri: str, named: bool) -> None:
    from rlscale.tracking.run import safe_uri

    if not named and header.get("tracking_uri") != uri:
        raise ValueError(f"written for the store {safe_uri(str(header.get('tracking_uri')))}, not the current one "
                         f"({safe_uri(uri)}); deliver it there with --uri")
    if header["run_id"] != path.stem:
        raise ValueError(f"written for the run {header['run_id']}, not for {path.stem!r} (its file name): refused")
    home = path.parent.resolve() / path.stem  # the spool folder the user named; below it, no link is followed
    for r in records:
        if "local_dir" not in r:
            continue
        folder = Path(r["local_dir"])
        if not folder.is_absolute() or ".." in folder.parts or not folder.is_relative_to(home):
            raise ValueError(f"a {r.get('kind')} record names the folder {r['local_dir']!r}, outside the spool's run "
                             f"folder {home}: refused")
        _check_tree(home, folder)


def _check_tree(home: Path, folder: Path) -> None:
    """Refuse a symbolic link on the way from `home` down to `folder` or anywhere in it (and anything in it but
    folders and regular files): each is looked at with lstat, never followed. No folder there: nothing is uploaded."""
    steps = folder.relative_to(home).parts
    for i in range(len(steps) + 1):
        here = home.joinpath(*steps[:i])
        try:
            mode = here.lstat().st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise _link(here)
        if not stat.S_ISDIR(mode):
            return

    def fail(e: OSError) -> None:
        raise e

    for root, dirs, files in os.walk(folder, onerror=fail):  # links are listed, not followed
        for name in dirs + files:
            entry = Path(root, name)
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise _link(entry)
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ValueError(f"{entry} is not a regular file: refused (nothing of this spool file was delivered)")


def pending(directory: str | Path) -> list[Path]:
    """Spool files waiting in `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(d.glob(f"*{SUFFIX}"), key=lambda p: (p.lstat().st_mtime, p.name))  # a dangling link too


def sync_spool(directory: str | Path, uri: str | None = None,
               client_factory: Callable[[str], Any] | None = None) -> SyncResult:
    """Deliver every spool file in `directory` to the store `uri` (default: the current store, and then only the
    files written for it; see `sync_file`); a file that fails stays for the next sync."""
    from rlscale.tracking.run import tracking_uri

    result = SyncResult()
    target = uri or tracking_uri(None)
    for path in pending(directory):
        try:
            result.metrics += sync_file(path, target, client_factory, named=uri is not None)
            result.synced.append(path.stem)
        except Exception as e:  # keep going: one unreachable store or bad file must not block the others
            result.failed[str(path)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
    return result
