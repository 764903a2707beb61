"""One training run in MLflow: tags, flattened params, batched metrics with cost and heartbeat, and its fate."""

from __future__ import annotations

import logging
import os
import platform
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlscale.tracking.cost import cost_usd, load_prices
from rlscale.tracking.spool import Spool, default_spool_dir, deliver, sync_file

try:
    import fcntl
except ImportError:  # not on POSIX
    fcntl = None  # type: ignore[assignment]

DEFAULT_ROOT = Path("mlruns")
# A name (config key, URL query parameter) is secret when one of its words (split at '_', '-', '.' and camelCase)
# ends in one of these: db_password, sslpassword, api_key, apiKey, access_token, X-Amz-Signature; not max_new_tokens
SECRET_WORDS = ("password", "passwd", "passphrase", "pass", "pwd", "token", "secret", "key", "credential",
                "credentials", "signature", "sig")
_SECRET_WORD = re.compile(f"(?:{'|'.join(SECRET_WORDS)})$")
_WORD_BREAK = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# scheme://user:PASSWORD@host, the password as SQLAlchemy and urllib read it: anything up to the '@' ('/' included)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^@\s]+@")
_QUERY_NAME = re.compile(r"[?&](?P<name>[^=&?\s]+)=")  # `?name=` or `&name=` of a query string
_QUERY_VALUE_END = re.compile(r"[&\s]|$")  # a value runs to the next '&', as SQLAlchemy and urllib read it
STORE_WAIT_SECONDS = 30.0  # how long a run's end (or its creation) waits for an unreachable store
MAX_BACKOFF_SECONDS = 60.0  # longest pause between two tries to deliver metrics while the store is down
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"  # the UI's "Training runs" view
MAX_BUFFER = 200_000  # metric values held in memory while the store is down; beyond, they go to the spool
# MLflow error codes a later try can cure (besides connection errors, timeouts and a server's 500)
TRANSIENT_CODES = frozenset({
    "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "IO_ERROR", "COULD_NOT_ACQUIRE_LOCK",
})
log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The tracking store could not be reached (or written) when the run was to be created; nothing was trained."""


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 10:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def is_transient(exc: BaseException) -> bool:
    """True for store errors a later try can cure: connection refused or reset, timeouts, a server's 5xx, a locked
    or busy database. False for the rest (a bad value, an invalid artifact path, a deleted run): those raise."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import RestException

    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                          requests.exceptions.Timeout, sqlalchemy.exc.OperationalError)):
            return True
    if not isinstance(exc, MlflowException):
        return False
    message = str(exc)
    return (exc.error_code in TRANSIENT_CODES
            or "database is locked" in message.lower()
            or (message.startswith("API request to") and " failed with " in message  # no answer, or a 5xx
                and ("exception" in message or "error code 5" in message))
            or (isinstance(exc, RestException) and exc.error_code == "INTERNAL_ERROR"))  # the server's 500


def retry(fn: Callable[..., T], *args: Any, wait: float = STORE_WAIT_SECONDS, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, tried again on transient store errors (jittered backoff from 50 ms to 2 s) for up
    to `wait` seconds; the last error is raised after that, a permanent one at once."""
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 2.0)


_READY_STORES: set[str] = set()


def _prepare_sqlite(db: Path, uri: str) -> None:
    """Create (and migrate) the SQLite store once, under a file lock: MLflow builds its tables on first use, and
    several processes starting at once on a new store would otherwise race through the migrations."""
    if uri in _READY_STORES:
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            retry(MlflowClient(uri).search_experiments, max_results=1)
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(uri)


def tracking_uri(uri: str | None = None, root: Path = DEFAULT_ROOT) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store `<root>/mlflow.db` (created when
    missing, safely when several processes start on it at once)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    db = (root / "mlflow.db").resolve()
    uri = f"sqlite:///{db}"
    _prepare_sqlite(db, uri)
    return uri


def probe_database(uri: str, timeout: int = 5, what: str = "tracking store") -> None:
    """Connect once to a database store (PostgreSQL, MySQL, MSSQL) or an MLflow server and raise the connection
    error if it does not answer: MLflow itself retries an unreachable store for minutes before it gives up. A URL
    the driver cannot use (an option it rejects, such as `?token=` on PostgreSQL; an unknown or missing driver) is
    a StoreError of one line naming `what`, at once."""
    import sqlalchemy

    dialect = uri.split(":", 1)[0].split("+", 1)[0]
    try:
        if dialect in ("http", "https"):  # an MLflow server: does anything answer (any status: it may want a login)
            import requests

            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            return
        if dialect not in ("postgresql", "mysql", "mssql"):
            return
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout} if dialect != "mssql" else {})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:
        if is_transient(e):  # no answer (yet): the caller may try again
            raise
        raise StoreError(f"{what} {safe_uri(uri)} cannot be used: {_first_line(e)}") from e


def wait_for_store(uri: str, wait: float | None = None, what: str = "tracking store") -> None:
    """`probe_database`, tried again while the store does not answer, for up to `wait` seconds (default
    STORE_WAIT_SECONDS); a StoreError of one line naming `what` when it never answers or refuses the URL."""
    wait = STORE_WAIT_SECONDS if wait is None else wait
    try:
        retry(probe_database, uri, what=what, wait=wait)
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{what} {safe_uri(uri)} unreachable (waited {wait:g} s): {_first_line(e)}") from e


def open_client(uri: str | None = None, root: Path = DEFAULT_ROOT, wait: float | None = None) -> MlflowClient:
    """A client of the store `tracking_uri(uri, root)`; a database store that does not answer within `wait` seconds
    (default STORE_WAIT_SECONDS), or whose URL its driver refuses, is a StoreError, before anything starts."""
    uri = tracking_uri(uri, root)
    wait_for_store(uri, wait)
    return MlflowClient(uri)


def experiment_id(client: MlflowClient, name: str, root: Path = DEFAULT_ROOT) -> str:
    """The id of experiment `name`, created (artifacts under `<root>/artifacts/`) when missing; safe when
    several processes create it at once. It is marked as model training (`mlflow.experimentKind`), so the MLflow
    UI opens it on its runs table, not on the GenAI overview."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND) != TRAINING:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, TRAINING)
        return exp.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "experiment"  # no '/', no '..'
        artifacts = (Path(root) / "artifacts" / folder).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND: TRAINING})
    except MlflowException as e:
        exp = client.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:  # not the race of two processes creating it: a real error
            raise
        return exp.experiment_id


def safe_uri(text: str) -> str:
    """`text` with the secrets of any URL in it masked: the password (`user:***@host`) and the value of every
    password-like query parameter (`?password=***`, `&api_key=***`; see `is_secret_name`), which runs to the next
    '&' or space (so a message puts a space after a URL). The one function every output (error lines, logs, tags,
    params, config.json, the terminal) passes text through."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    out, done = [], 0
    for m in _QUERY_NAME.finditer(text):
        if m.start() < done or not is_secret_name(m["name"]):
            continue
        end = _QUERY_VALUE_END.search(text, m.end()).start()
        if end > m.end():  # an empty value hides nothing
            out += [text[done:m.end()], "***"]
            done = end
    return "".join(out) + text[done:]


def is_secret_name(name: str) -> bool:
    """Whether a config key or URL query parameter (%-escapes decoded) names a secret (see SECRET_WORDS)."""
    words = _WORD_BREAK.split(unquote_plus(str(name)))
    return any(_SECRET_WORD.search(w.lower().rstrip("0123456789")) for w in words)


def _is_secret(key: str, value: Any) -> bool:
    return is_secret_name(key) and value not in (None, "")


def masked(data: Any) -> Any:
    """A copy of a nested config (dicts, lists, scalars) with values of secret-looking keys replaced by `***`
    and the password of any URL masked: safe to log as an artifact (`config.json`)."""
    if isinstance(data, dict):
        return {k: "***" if _is_secret(k, v) else masked(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [masked(v) for v in data]
    if isinstance(data, str):
        return safe_uri(data)
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'}, with values of secret-looking keys masked, and so the password of any
    URL (`postgresql://user:***@host/db` in a tracking or storage URI)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = "***" if _is_secret(k, v) else safe_uri(str(v))[:6000]
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
    with `cost/usd` (from `compute/device_seconds` and the price table) and a `heartbeat` timestamp. The run is
    billed until it ends: the time after the trainer's last compute metrics (saving, logging the model) is added
    at the end to `compute/device_seconds/other` for the `devices` it holds (0: only what the trainer
    measured). With a `summary` set, the run's fate writes its one-line description (`mlflow.note.content`).
    `system_metrics` starts MLflow's own sampler of CPU, memory, disk, network and GPU use (`system/*`). An
    exception of a `pruned_on` type (an Optuna trial pruned) ends the run KILLED with the tag `pruned=true`.

    The store may go away during the run (a server restarted, a database locked by another writer): training
    goes on, the metrics stay buffered and are sent again with backoff (1 s doubling to 60 s) until the store
    takes them. At the end it is waited for up to `store_wait_seconds`; what it still has not taken (metrics,
    tags, small artifacts, the final status) is appended to the run's spool file in `spool_dir` (default
    `<root>/spool/`) for `tracking.spool.sync_spool` (`rlscale runs sync`). A store that cannot be reached when
    the run is created is a `StoreError`, before anything is trained. With `joined`, `resume_run_id` is a RUNNING run
    that another party opened (a user's `mlflow.start_run()` around a trainer): it is written to, not reopened."""

    def __init__(self, client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str],
                 params: dict[str, str], device: str, prices: dict[str, float] | None = None,
                 flush_seconds: float = 10.0, root: Path = DEFAULT_ROOT, resume_run_id: str | None = None,
                 devices: float = 0.0, system_metrics: bool = False,
                 pruned_on: tuple[type[BaseException], ...] = (), spool_dir: Path | None = None,
                 store_wait_seconds: float | None = None, joined: bool = False,
                 ancestors: dict[str, float] | None = None):
        self.client = client
        self.ancestors = ancestors  # compute/flops and cost/usd of the runs this one's model started from
        self.device = device
        self.pruned_on = pruned_on  # exceptions that mean "stopped early on purpose": KILLED, tagged pruned
        self.prices = prices or load_prices()
        self.flush_seconds = flush_seconds
        self.store_wait = STORE_WAIT_SECONDS if store_wait_seconds is None else store_wait_seconds
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(root)
        commit, dirty = git_info()
        all_tags = {"project": experiment, "host": socket.gethostname(), "git.commit": commit,
                    "git.dirty": dirty, "python": platform.python_version(), "device.price_key": device} | tags
        self.run_id = resume_run_id or ""
        try:
            if resume_run_id and not joined:  # a resumed training continues its own run: cumulative metrics carry on
                retry(client.update_run, resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING),
                      wait=self.store_wait)
                retry(client.set_tag, resume_run_id, "resumed", "true", wait=self.store_wait)
            else:  # a new run, or one someone else opened (around a TRL trainer): written to as it is
                if not resume_run_id:
                    exp_id = retry(experiment_id, client, experiment, root, wait=self.store_wait)
                    run = retry(client.create_run, exp_id, tags=all_tags, run_name=run_name, wait=self.store_wait)
                    self.run_id = run.info.run_id
                else:  # opened by another party: this run's tags too
                    retry(client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
                          wait=self.store_wait)
                items = list(params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                    retry(client.log_batch, self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]],
                          wait=self.store_wait)
        except Exception as e:
            if not is_transient(e):
                raise
            if self.run_id and not resume_run_id:  # created but unusable: do not leave it RUNNING
                try:
                    client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FAILED))
                except Exception:
                    pass
            raise StoreError(f"tracking store {safe_uri(client.tracking_uri)} unreachable, no run created "
                             f"(waited {self.store_wait:g} s): {_first_line(e)}") from e
        self.spool = Spool(self.spool_dir, self.run_id, client.tracking_uri)
        self._buffer: list[Metric] = []
        self._pending: list[dict[str, Any]] = []  # tags and artifacts the store did not take yet (in order)
        self._spooled = False  # metrics of this run wait in its spool file (the store was down too long)
        self._failures = 0  # consecutive failed deliveries
        self._retry_at = 0.0  # monotonic time before which no new delivery is tried
        self._last_flush = time.monotonic()
        self.last: dict[str, float] = {}
        self.summary = ""  # what the run is ("arithmetic on nano"): opens its description (`mlflow.note.content`)
        self.unit = str(tags.get("device.unit", "device"))
        self.devices = devices
        self._hardware = {k: str(v) for k, v in tags.items() if k.startswith("device.")}  # for perf/*
        self._compute_at: tuple[float, int] | None = None  # (monotonic time, step) of the last compute metrics
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
        metrics = metrics | self._lineage(metrics) | {"heartbeat": now / 1000.0}
        if "compute/device_seconds" in metrics:
            self._compute_at = (time.monotonic(), step)
        self.last |= metrics
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # NaN dropped
        clock = time.monotonic()
        if clock - self._last_flush >= self.flush_seconds and clock >= self._retry_at:
            self.flush()
        if len(self._buffer) > MAX_BUFFER:  # the store has been down long: keep memory bounded, lose nothing
            self._spill()

    def _lineage(self, metrics: dict[str, float]) -> dict[str, float]:
        """`compute/flops/lineage` and `cost/usd_lineage`: this run's own plus its ancestors' (a shared SFT)."""
        if self.ancestors is None:
            return {}
        pairs = (("compute/flops", "compute/flops/lineage"), ("cost/usd", "cost/usd_lineage"))
        return {name: metrics[own] + self.ancestors.get(own, 0.0) for own, name in pairs if own in metrics}

    def _send(self) -> None:
        """Deliver the spool (if this run has one), the buffer, then the tags and artifacts kept while the store
        was down; raises on the first error, keeping what is left."""
        if self._spooled:
            sync_file(self.spool.path, self.client.tracking_uri, client_factory=lambda _uri: self.client)
            self._spooled = False
        while self._buffer:
            self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
            del self._buffer[:1000]
        while self._pending:
            deliver(self.client, self.run_id, self._pending[0])
            self._pending.pop(0)

    def flush(self) -> bool:
        """Send buffered metrics (1000 per call, MLflow's batch limit); True when the store has them all.

        On a transient error (server down, database locked) they stay buffered, the next try waits (1 s,
        doubling up to 60 s) and the training goes on; other errors raise."""
        try:
            self._send()
        except Exception as e:
            if not is_transient(e):
                raise
            self._failures += 1
            self._retry_at = time.monotonic() + min(MAX_BACKOFF_SECONDS, 2.0 ** (self._failures - 1))
            if self._failures == 1:
                log.warning("tracking store %s not reachable (%s); metrics are kept and sent when it is back",
                            safe_uri(self.client.tracking_uri), _first_line(e))
            return False
        finally:
            self._last_flush = time.monotonic()
        if self._failures:
            log.warning("tracking store %s is back; buffered metrics delivered", safe_uri(self.client.tracking_uri))
            self._failures, self._retry_at = 0, 0.0
            self._undo_reconcile(RunStatus.to_string(RunStatus.RUNNING))
        return True

    def _undo_reconcile(self, status: str) -> None:
        """After an outage: if `rlscale runs reconcile` took the silent run for dead meanwhile (KILLED, tag
        `reconciled`), put it back to `status` (it was alive, only unheard)."""
        try:
            run = self.client.get_run(self.run_id)
            if "reconciled" in run.data.tags:
                self.client.delete_tag(self.run_id, "reconciled")
                self.client.update_run(self.run_id, status=status)
        except Exception as e:
            if not is_transient(e):
                raise

    def _spill(self) -> None:
        """Move the buffered metrics to the spool file (fsynced); they are delivered with the next success."""
        self.spool.append([_metrics_record(self._buffer)])
        self._buffer.clear()
        self._spooled = True

    def _record(self, record: dict[str, Any]) -> None:
        """Deliver a tag or artifact record now, or keep it for the end (and the spool) if the store is down."""
        if self._failures or self._pending:  # the store is known to be down: do not stall the training
            self._pending.append(record)
            return
        try:
            retry(deliver, self.client, self.run_id, record, wait=min(5.0, self.store_wait))
        except Exception as e:
            if not is_transient(e):
                raise
            self._pending.append(record)

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag of the run (kept for later delivery while the store is down)."""
        self.set_tags({key: value})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags of the run at once (kept for later delivery while the store is down)."""
        self._record({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Log a JSON-serialisable object as an artifact (kept for later delivery while the store is down)."""
        self._record({"kind": "dict", "artifact_file": artifact_file, "data": data})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Log a folder's files as artifacts (its path is kept for later delivery while the store is down)."""
        self._record({"kind": "artifacts", "local_dir": str(Path(local_dir).resolve()),
                      "artifact_path": artifact_path})

    def log_dataset(self, dataset: dict[str, str | None], context: str) -> None:
        """Record a dataset (an MLflow Dataset's fields: name, digest, source_type, source, schema, profile) as an
        input of the run, used as `context` ('train', 'eval')."""
        self._record({"kind": "dataset", "context": context, "dataset": dataset})

    def log_model(self, local_dir: str | Path, name: str, step: int, metrics: dict[str, float],
                  dataset: dict[str, str | None] | None = None, params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Log a model folder as an MLflow LoggedModel of this run (an output at `step`), with `metrics` linked to
        it and to `dataset` (the one they were measured on)."""
        self._record({"kind": "logged_model", "name": name, "local_dir": str(Path(local_dir).resolve()),
                      "step": step, "timestamp": int(time.time() * 1000), "dataset": dataset, "params": params,
                      "tags": tags, "metrics": {k: float(v) for k, v in metrics.items() if v == v}})

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # the sampler must not decide the run's fate
                log.warning("system metrics monitor: %s", e)
        tags: dict[str, str] = {}
        if exc_type is None:
            status = RunStatus.to_string(RunStatus.FINISHED)
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.to_string(RunStatus.KILLED)
        elif self.pruned_on and issubclass(exc_type, self.pruned_on):
            status = RunStatus.to_string(RunStatus.KILLED)
            tags["pruned"] = "true"
        else:
            status = RunStatus.to_string(RunStatus.FAILED)
            tags |= {"error.class": exc_type.__name__, "error.message": str(exc)[:5000]}
        self._bill_to_end()
        if self.summary:
            tags["mlflow.note.content"] = describe(self.summary, self.last, status, self.unit)
        try:
            self.finish(status, tags)
        except Exception as e:
            if exc_type is None:
                raise
            log.error("could not record the run's end: %s", e)  # the training's own error matters more
        return False

    def _bill_to_end(self) -> None:
        """Add the held time since the trainer's last compute metrics (saving, logging) to the run's bill."""
        if self._compute_at is None:
            return
        since, step = self._compute_at
        extra = (time.monotonic() - since) * self.devices
        total = self.last["compute/device_seconds"] + extra
        metrics = {"compute/device_seconds": total, "compute/gpu_hours": total / 3600.0,
                   "compute/device_seconds/other": self.last.get("compute/device_seconds/other", 0.0) + extra,
                   "cost/usd": cost_usd(total, self.device, self.prices)}
        metrics |= self._lineage(metrics)
        metrics |= self._perf(self.last | metrics)
        self.last |= metrics
        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def _perf(self, metrics: dict[str, float]) -> dict[str, float]:
        """`perf/*`, MFU by phase (tracking/peak.py), from the run's compute metrics and the peak of the devices it
        holds, which the tag `perf.peak_source` names; none when that peak is unknown (the tag says why)."""
        if self.devices <= 0:
            return {}
        from rlscale.tracking.peak import device_peak, perf_metrics  # imports torch: not at module level

        try:
            peak = device_peak(self._hardware)
        except Exception as e:  # a missing peak must not decide the run's fate
            log.warning("no MFU for run %s: %s", self.run_id, _first_line(e))
            self.set_tag("perf.peak_source", f"none: {_first_line(e)}")
            return {}
        self.set_tag("perf.peak_source", peak.source)
        return perf_metrics(metrics, peak.flops, self.devices)

    def finish(self, status: str, tags: dict[str, str] | None = None) -> Path | None:
        """Send what is left, the `tags` and the final `status`; waits up to `store_wait_seconds` for the store,
        then spools the rest and returns the spool file (None when the store took everything)."""
        if tags:
            self._pending.append({"kind": "tags", "tags": tags})
        deadline = time.monotonic() + self.store_wait
        delay = 0.05
        while True:
            try:
                had_outage = self._failures > 0
                self._send()
                if had_outage:
                    self._undo_reconcile(status)
                self.client.set_terminated(self.run_id, status=status)
                return None
            except Exception as e:
                self._failures += is_transient(e)
                if not is_transient(e):
                    if not self._pending or self._buffer:
                        raise
                    # a tag or artifact the store refuses for good (an invalid name): the fate still counts
                    log.error("run %s: dropped %s record the store refuses: %s", self.run_id,
                              self._pending.pop(0)["kind"], _first_line(e))
                    continue
                if time.monotonic() + delay > deadline:
                    break
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)
        records = ([_metrics_record(self._buffer)] if self._buffer else []) + self._pending
        records.append({"kind": "status", "status": status, "end_time": int(time.time() * 1000)})
        path = self.spool.append(records)
        self._buffer.clear()
        self._pending.clear()
        log.warning("tracking store %s unreachable: run %s ended %s; its last metrics, tags and status are in %s "
                    "(deliver them with `rlscale runs sync`)", safe_uri(self.client.tracking_uri), self.run_id,
                    status, path)
        return path


def describe(what: str, m: dict[str, float], status: str, unit: str = "device") -> str:
    """A run's one-line description: what it is, SFT -> RL accuracy, self-verification, compute, cost, fate."""
    parts = [what]
    if "eval/accuracy" in m and "eval/sft_accuracy" in m:
        parts.append(f"held-out accuracy {m['eval/sft_accuracy']:.1%} after SFT -> {m['eval/accuracy']:.1%} after "
                     f"RL ({100 * (m['eval/accuracy'] - m['eval/sft_accuracy']):+.1f} points)")
    elif "eval/accuracy" in m:
        parts.append(f"held-out accuracy {m['eval/accuracy']:.1%}")
    if "eval/verify_balanced_accuracy" in m:
        parts.append(f"self-verification {m['eval/verify_balanced_accuracy']:.1%} balanced accuracy")
    if "compute/flops" in m:
        parts.append(f"{m['compute/flops']:.3g} FLOPs, {m.get('compute/gpu_hours', 0.0):.3g} {unit}-hours, "
                     f"${m.get('cost/usd', 0.0):.4g}")
    parts.append(status.lower())
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    return safe_uri((str(exc).splitlines() or [type(exc).__name__])[0][:300])


def _metrics_record(metrics: list[Metric]) -> dict[str, Any]:
    return {"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]}
