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
BULK_DIALECTS = ("sqlite", "postgresql")  # stores whose `metrics` table metric_histories reads directly
Progress = Callable[[str, int, int], None]  # told (what, done, total) as long work advances


def metric_histories(run_ids: list[str], keys: list[str] | tuple[str, ...], uri: str | None = None,
                     root: str | Path = "mlruns", *, at: str | None = None,
                     progress: Progress | None = None) -> pd.DataFrame:
    """Every logged value of each metric in `keys` of each run, as MlflowClient.get_metric_history returns them:
    run_id, key, step, timestamp (UTC) and value (NaN where NaN was logged), in run, key, step, timestamp and value
    order. On a SQLite or PostgreSQL store, read in bulk: one query per BULK_RUNS runs on MLflow's `metrics` table
    (the client has no bulk call); on another store (a tracking server) one call per run and key, with one client.

    With `at` (a metric), a bulk read keeps only the rows that decide each key's value at the steps where `at` was
    logged (not NaN), taken there or carried forward: for each such step and key, the key's latest non-NaN row at its
    last step at or before it. A run that logs compute every step and evals every few hundred then reads about one
    row a key and eval, not every step's. Another store's read keeps every row. `progress` is told the runs read."""
    ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
    df = pd.DataFrame(columns=HISTORY_COLUMNS)
    if ids and keys:  # nothing to read: the store is left as it is (an embedded one is not even created)
        uri = tracking_uri(uri, Path(root))
        try:
            probe_database(uri)
            if uri.split(":", 1)[0].split("+", 1)[0] in BULK_DIALECTS:
                df = _sql_histories(uri, ids, keys, at, progress)
            else:
                client, rows = MlflowClient(uri), []
                for done, run_id in enumerate(ids):
                    if progress is not None:
                        progress("reading metric histories", done, len(ids))
                    rows += [(run_id, key, m.step, m.timestamp, m.value)
                             for key in keys for m in client.get_metric_history(run_id, key)]
                df = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
        except (MlflowException, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise _store_error(uri, e) from None
        if progress is not None:
            progress("reading metric histories", len(ids), len(ids))
    df = df.astype({"step": "int64", "timestamp": "int64", "value": "float64"})
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    return df.sort_values(["run_id", "key", "step", "timestamp", "value"], kind="stable", ignore_index=True)


_METRICS = sqlalchemy.table("metrics", sqlalchemy.column("run_uuid"), sqlalchemy.column("key"),
                            sqlalchemy.column("step"), sqlalchemy.column("timestamp"), sqlalchemy.column("value"),
                            sqlalchemy.column("is_nan", sqlalchemy.Boolean))  # MLflow's, the columns read


def _sql_histories(uri: str, ids: list[str], keys: list[str], at: str | None,
                   progress: Progress | None) -> pd.DataFrame:
    """The rows of MLflow's `metrics` table for these runs and keys (with `at`, only those metric_histories
    describes), BULK_RUNS runs a query; a NaN logged (stored as 0 with is_nan) is NaN again."""
    engine = sqlalchemy.create_engine(uri)
    chunks = []
    try:
        with engine.connect() as db:
            for i in range(0, len(ids), BULK_RUNS):
                if progress is not None:
                    progress("reading metric histories", i, len(ids))
                chunk = ids[i:i + BULK_RUNS]
                query = (sqlalchemy.select(*_METRICS.c).where(_METRICS.c.key.in_(keys), _METRICS.c.run_uuid.in_(chunk))
                         if at is None else _rows_at(chunk, keys, at))
                chunks.append(pd.DataFrame(db.execute(query).all(), columns=[*HISTORY_COLUMNS, "is_nan"]))
    finally:
        engine.dispose()
    df = pd.concat(chunks, ignore_index=True)
    df["value"] = df["value"].astype("float64").where(~df.pop("is_nan").astype(bool))
    return df


def _rows_at(ids: list[str], keys: list[str], at: str) -> sqlalchemy.Select:
    """For each step where `at` was logged (not NaN) and each key: the key's latest row (by timestamp, then value)
    at its last step at or before it, not NaN; each found by index lookups (run, key, step), whatever the history's
    length. The rows a reader needs that takes a key's last value at that step, or carries it forward."""
    steps = (sqlalchemy.select(_METRICS.c.run_uuid, _METRICS.c.step)
             .where(_METRICS.c.key == at, _METRICS.c.run_uuid.in_(ids), ~_METRICS.c.is_nan).distinct().cte("at_steps"))
    earlier = _METRICS.alias("earlier")

    def latest(key: str, column: str) -> sqlalchemy.ScalarSelect:
        return (sqlalchemy.select(earlier.c[column])
                .where(earlier.c.run_uuid == steps.c.run_uuid, earlier.c.key == key, earlier.c.step <= steps.c.step,
                       ~earlier.c.is_nan)
                .order_by(earlier.c.step.desc(), earlier.c.timestamp.desc(), earlier.c.value.desc())
                .limit(1).scalar_subquery())

    found = sqlalchemy.union(*(sqlalchemy.select(steps.c.run_uuid, *(latest(key, c).label(c) for c in
                                                                     ("key", "step", "timestamp", "value")))
                               for key in keys)).subquery("found")
    return sqlalchemy.select(*found.c, sqlalchemy.false().label("is_nan")).where(found.c.key.is_not(None))


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
