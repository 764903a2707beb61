"""Every run in an MLflow store as one pandas table (all fates), and a run's metric history on demand."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import sqlalchemy.exc
from mlflow.entities import RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.tracking import MlflowClient

from rlscale.tracking.run import probe_database, tracking_uri

CORE_COLUMNS = ["run_id", "experiment", "run_name", "status", "fate", "start_time", "end_time", "parent_run_id"]
FATES = ("finished", "failed", "killed", "pruned", "running")
STATUSES = tuple(RunStatus.to_string(s) for s in RunStatus.all_status())
_FATE_OF_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running",
                   "SCHEDULED": "running"}


class RunsError(ValueError):
    """A store that cannot be read, an unknown experiment or a filter that cannot be expressed."""


def load_runs(uri: str | None = None, experiments: list[str] | None = None, *, phase: str | None = None,
              status: str | list[str] | None = None, tags: dict[str, str] | None = None,
              root: str | Path = "mlruns") -> pd.DataFrame:
    """One row per run of the named experiments (all active ones when None), whatever its fate, oldest first.

    Columns: CORE_COLUMNS, then `tags.<name>`, `params.<name>` and each metric's last value under its own name.
    `status` is one or several MLflow statuses (FINISHED, FAILED, KILLED, RUNNING, SCHEDULED); `phase` and
    `tags` keep runs whose tags equal the given values. A run's fate is 'pruned' when its tag pruned is "true",
    else its status in lower case (SCHEDULED counts as 'running'). Deleted runs are left out, and so are deleted
    experiments unless named."""
    statuses = _statuses(status)
    wanted = (tags or {}) | ({"phase": phase} if phase else {})
    conditions = [_tag_condition(k, v) for k, v in wanted.items()]
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    db = Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None
    if uri is None:
        db = Path(root) / "mlflow.db"
    if db is not None and not db.is_file():  # never created: an empty store, left uncreated (reading writes nothing)
        if experiments:
            raise RunsError(f"no store at {db}, so no experiment named {experiments[0]!r}")
        return pd.DataFrame(columns=CORE_COLUMNS)
    uri = tracking_uri(uri, Path(root))
    try:
        probe_database(uri)
        client = MlflowClient(uri)
        names = _experiment_names(client, experiments)
        runs = []
        for s in statuses or [None]:
            where = " and ".join(conditions + ([f"attributes.status = '{s}'"] if s else []))
            if names:
                runs += _all_pages(client.search_runs, experiment_ids=list(names), filter_string=where)
    except (MlflowException, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _store_error(uri, e) from None
    return _frame(runs, names)


def load_run_ids(run_ids: list[str], uri: str | None = None, root: str | Path = "mlruns") -> pd.DataFrame:
    """The named runs (whatever their experiment; deleted or absent ones left out) as load_runs rows: the ancestors
    a lineage names outside the experiments a report reads."""
    if not run_ids:
        return pd.DataFrame(columns=CORE_COLUMNS)
    uri = tracking_uri(uri, Path(root))
    try:
        probe_database(uri)
        client = MlflowClient(uri)
        runs = []
        for run_id in dict.fromkeys(run_ids):
            try:
                run = client.get_run(run_id)
            except MlflowException:  # not in this store
                continue
            if run.info.lifecycle_stage == "active":
                runs.append(run)
        names = {i: client.get_experiment(i).name for i in {r.info.experiment_id for r in runs}}
    except (MlflowException, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _store_error(uri, e) from None
    return _frame(runs, names)


def _frame(runs: list, names: dict[str, str]) -> pd.DataFrame:
    """MLflow runs as one table: core columns, tags, params and each metric's last value, oldest first."""
    rows = [r.data.metrics | {f"tags.{k}": v for k, v in r.data.tags.items()}
            | {f"params.{k}": v for k, v in r.data.params.items()} | _core(r, names) for r in runs]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=CORE_COLUMNS + sorted(set(df.columns) - set(CORE_COLUMNS)))
    for col in ("start_time", "end_time"):
        df[col] = pd.to_datetime(df[col], unit="ms", utc=True)
    return df.sort_values("start_time", kind="stable", ignore_index=True)


def metric_history(run_id: str, key: str, uri: str | None = None, root: str | Path = "mlruns") -> pd.DataFrame:
    """Every logged value of metric `key` of a run: step, timestamp (UTC) and value, in step order."""
    uri = tracking_uri(uri, Path(root))
    try:
        probe_database(uri)
        history = MlflowClient(uri).get_metric_history(run_id, key)
    except (MlflowException, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _store_error(uri, e) from None
    df = pd.DataFrame([(m.step, m.timestamp, m.value) for m in history], columns=["step", "timestamp", "value"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    return df.sort_values(["step", "timestamp"], kind="stable", ignore_index=True)


HISTORY_COLUMNS = ["run_id", "key", "step", "timestamp", "value"]
BULK_RUNS = 500  # run ids in one bulk history query (SQLite takes at least 999 bound variables)


def metric_histories(run_ids: list[str], keys: list[str] | tuple[str, ...], uri: str | None = None,
                     root: str | Path = "mlruns") -> pd.DataFrame:
    """Every logged value of each metric in `keys` of each run, read in bulk: run_id, key, step, timestamp (UTC) and
    value, in run, key, step and timestamp order. On a SQL store (SQLite, PostgreSQL, ...) one query per key and
    BULK_RUNS runs; on another store (a tracking server) one call per run and key, with one client."""
    ids = list(dict.fromkeys(run_ids))
    rows: list[tuple] = []
    if ids and keys:  # nothing to read: the store is left as it is (an embedded one is not even created)
        uri = tracking_uri(uri, Path(root))
        try:
            probe_database(uri)
            client = MlflowClient(uri)
            bulk = getattr(client._tracking_client.store, "get_metric_history_bulk", None)
            for key in keys:
                for i in range(0, len(ids), BULK_RUNS):
                    chunk = ids[i:i + BULK_RUNS]
                    if bulk is not None:
                        rows += [(m.run_id, key, m.step, m.timestamp, m.value)
                                 for m in bulk(chunk, key, max_results=2**62)]
                    else:
                        rows += [(rid, key, m.step, m.timestamp, m.value)
                                 for rid in chunk for m in client.get_metric_history(rid, key)]
        except (MlflowException, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise _store_error(uri, e) from None
    df = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    return df.sort_values(["run_id", "key", "step", "timestamp"], kind="stable", ignore_index=True)


def _core(run, names: dict[str, str]) -> dict:
    info, tags = run.info, run.data.tags
    return {"run_id": info.run_id, "experiment": names[info.experiment_id], "run_name": info.run_name,
            "status": info.status, "fate": "pruned" if tags.get("pruned") == "true" else _FATE_OF_STATUS[info.status],
            "start_time": info.start_time, "end_time": info.end_time, "parent_run_id": tags.get("mlflow.parentRunId")}


def _experiment_names(client: MlflowClient, experiments: list[str] | None) -> dict[str, str]:
    """Experiment id -> name for the named experiments, or for every active one."""
    if experiments is None:
        return {e.experiment_id: e.name for e in _all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)}
    names = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise RunsError(f"no experiment named {name!r} in the store {_redact(client.tracking_uri)}")
        names[exp.experiment_id] = exp.name
    return names


def _all_pages(search: Callable, **kwargs) -> list:
    """Every result of an MLflow search, page after page."""
    items, token = [], None
    while True:
        page = search(**kwargs, max_results=SEARCH_MAX_RESULTS_DEFAULT, page_token=token)
        items += page
        token = page.token
        if not token:
            return items


def _statuses(status: str | list[str] | None) -> list[str]:
    wanted = [status] if isinstance(status, str) else list(status or [])
    unknown = [s for s in wanted if s.upper() not in STATUSES]
    if unknown:
        raise RunsError(f"unknown run status {', '.join(map(repr, unknown))}; known: {', '.join(STATUSES)}")
    return sorted({s.upper() for s in wanted})


def _tag_condition(key: str, value: str) -> str:
    """An MLflow filter clause `tags.<key> = <value>`, quoted so that dots and quotes survive."""
    quote = "'" if "'" not in value else '"'
    if "`" in key or quote in value:
        raise RunsError(f"cannot filter on tag {key}={value!r}: MLflow filters cannot quote it")
    return f"tags.`{key}` = {quote}{value}{quote}"


def _store_error(uri: str, e: Exception) -> RunsError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RunsError(f"cannot read the MLflow store {_redact(uri)}: {first[:300]}")


def _redact(uri: str) -> str:
    """The URI with any password replaced by ***."""
    return re.sub(r"//([^/@:]+):[^/@]*@", r"//\1:***@", uri)
