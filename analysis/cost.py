"""What the whole project cost, beyond the final run: every recorded run plus a ledger of costs MLflow never saw."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal, get_args

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlscale.analysis.runs import FATES
from rlscale.tracking.cost import load_prices

Category = Literal["final_run", "prior_runs", "human_data", "hardware", "staff", "other"]
CATEGORIES: tuple[str, ...] = get_args(Category)
LEDGER_COLUMNS = ["name", "category", "method", "usd", "gpu_hours", "device", "note"]
# each way to price an item, and the keys it takes (all of them)
METHODS = {"usd": ("usd",), "gpu_hours": ("gpu_hours", "usd_per_gpu_hour"), "hours": ("hours", "usd_per_hour"),
           "capex": ("capex_usd", "amortization_years", "used_years")}
NO_PHASE = "(none)"

MAX_AMOUNT = 1e15  # any amount, hours or rate above a quadrillion is a typo; it also keeps every total finite
Amount = Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]


class LedgerError(ValueError):
    """A ledger file that cannot be read, or an item in it that cannot be priced."""


class LedgerItem(BaseModel):
    """One `[[item]]` of a ledger, priced in exactly one way."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1)]
    category: Category
    usd: Amount | None = None
    gpu_hours: Amount | None = None
    usd_per_gpu_hour: Amount | None = None
    device: str | None = None
    hours: Amount | None = None
    usd_per_hour: Amount | None = None
    capex_usd: Amount | None = None
    amortization_years: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    used_years: Amount | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _one_price(self) -> LedgerItem:
        given = [m for m, keys in METHODS.items() if any(getattr(self, k) is not None for k in keys)]
        if not given:
            raise ValueError("no price: give usd, gpu_hours + usd_per_gpu_hour, hours + usd_per_hour, "
                             "or capex_usd + amortization_years + used_years")
        if len(given) > 1:
            raise ValueError(f"{len(given)} prices ({', '.join(given)}): give exactly one")
        missing = [k for k in METHODS[given[0]] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{given[0]} pricing also needs {', '.join(missing)}")
        if self.device is not None and given[0] != "gpu_hours":
            raise ValueError("device is only for gpu_hours pricing")
        if given[0] == "capex" and self.used_years > self.amortization_years:
            raise ValueError(f"used_years ({self.used_years}) exceeds amortization_years ({self.amortization_years})")
        return self

    @property
    def method(self) -> str:
        return next(m for m, keys in METHODS.items() if getattr(self, keys[0]) is not None)

    @property
    def cost_usd(self) -> float:
        """Dollars: the amount, hours x rate, or the used share of the capital cost."""
        match self.method:
            case "usd":
                return self.usd
            case "gpu_hours":
                return self.gpu_hours * self.usd_per_gpu_hour
            case "hours":
                return self.hours * self.usd_per_hour
            case _:
                return self.capex_usd * self.used_years / self.amortization_years


def load_ledger(path: str | Path) -> pd.DataFrame:
    """The `[[item]]` tables of a TOML ledger as a table: name, category, method, usd, gpu_hours, device, note."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise LedgerError(f"{p}: cannot read ledger: {e}") from None
    except RecursionError:
        raise LedgerError(f"{p}: cannot read ledger: nested too deeply") from None
    if set(data) - {"item"}:
        raise LedgerError(f"{p}: unknown top-level key(s) {', '.join(sorted(set(data) - {'item'}))}; "
                          "a ledger holds only [[item]] tables")
    raw = data.get("item", [])
    if not isinstance(raw, list):
        raise LedgerError(f"{p}: 'item' must be [[item]] tables")
    rows = []
    for i, entry in enumerate(raw, 1):
        label = f"item #{i}" + (f" ({entry['name']!r})" if isinstance(entry, dict) and "name" in entry else "")
        if not isinstance(entry, dict):
            raise LedgerError(f"{p}: {label}: must be a table")
        try:
            item = LedgerItem(**entry)
        except ValidationError as e:
            raise LedgerError(f"{p}: {label}: {'; '.join(_problem(err) for err in e.errors())}") from None
        rows.append({"name": item.name, "category": item.category, "method": item.method, "usd": item.cost_usd,
                     "gpu_hours": item.gpu_hours, "device": item.device, "note": item.note})
    return pd.DataFrame(rows, columns=LEDGER_COLUMNS).astype({"usd": float, "gpu_hours": float})


def _problem(err: dict) -> str:
    """One pydantic error as a short phrase."""
    where = ".".join(map(str, err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    return f"{where}: {err['msg']}"


def reprice(runs: pd.DataFrame, prices: str | Path) -> pd.DataFrame:
    """The runs with `cost/usd` recomputed from another price table: `compute/device_seconds` / 3600 x the price
    of each run's `device.price_key` (a run without device-seconds keeps no cost)."""
    table = load_prices(prices)
    if runs.empty or "compute/device_seconds" not in runs:
        return runs
    keys = runs["tags.device.price_key"] if "tags.device.price_key" in runs else pd.Series(None, index=runs.index)
    seconds = runs["compute/device_seconds"].astype(float)
    missing = sorted(set(keys[seconds.notna()].fillna("(no device.price_key tag)")) - set(table))
    if missing:
        raise ValueError(f"{prices}: no price for {', '.join(map(repr, missing))} that runs were billed as; "
                         f"add those [devices.KEY] entries")
    return runs.assign(**{"cost/usd": seconds / 3600.0 * keys.map(table).astype(float)})


def project_cost(runs: pd.DataFrame, ledger: pd.DataFrame | None = None, final_run_id: str | None = None) -> dict:
    """Total cost of the project, every run (any fate) plus every ledger item, as a JSON-ready dict.

    The final run is `final_run_id`, else the one run tagged phase=final; it is category final_run and every other
    run prior_runs. A run without `cost/usd` counts 0 (and in runs_without_cost). Device-hours are kept apart by
    unit (`device_hours`: GPU, vCPU, from each run's `device.unit` / `device.type` tag; ledger gpu_hours are GPU);
    `gpu_hours_*` count GPUs only. Sums are exact (math.fsum); by_phase and by_status cover the runs only, so they
    add up to runs_usd."""
    if len(runs) and not {"run_id", "fate"} <= set(runs.columns):
        raise ValueError("runs need the columns run_id and fate: load them with analysis.runs.load_runs")
    usd, gpu_hours, flops = (_metric(runs, k) for k in ("cost/usd", "compute/gpu_hours", "compute/flops"))
    phase = runs["tags.phase"].fillna(NO_PHASE) if "tags.phase" in runs else pd.Series(NO_PHASE, index=runs.index)
    fates = runs["fate"] if "fate" in runs else pd.Series([], dtype=str)
    if unknown := set(fates) - set(FATES):
        raise ValueError(f"unknown run fate(s) {', '.join(sorted(unknown))}; known: {', '.join(FATES)}")
    final = _final_mask(runs, phase, final_run_id)
    ledger = pd.DataFrame(columns=LEDGER_COLUMNS) if ledger is None else ledger
    l_usd, l_gpu = ledger["usd"].astype(float), ledger["gpu_hours"].astype(float).fillna(0.0)
    category = final.map({True: "final_run", False: "prior_runs"})
    usd0, hours0 = usd.fillna(0.0), gpu_hours.fillna(0.0)
    unit = _units(runs)
    by_category = _sums([*zip(category, usd0), *zip(ledger["category"], l_usd)], CATEGORIES)
    units = sorted(set(unit) | ({"GPU"} if len(ledger) else set()))
    hours = {u: _sums([*zip(category[unit == u], hours0[unit == u]),
                       *(zip(ledger["category"], l_gpu) if u == "GPU" else [])], CATEGORIES) for u in units}
    gpu_by_category = hours.get("GPU", dict.fromkeys(CATEGORIES, 0.0))
    has_final = bool(final.any() or (ledger["category"] == "final_run").any())
    final_usd = by_category["final_run"] if has_final else None
    total = math.fsum([*usd0, *l_usd])
    return {
        "total_usd": total,
        "final_run_usd": final_usd,
        "ratio_total_to_final": total / final_usd if final_usd else None,
        "final_run_id": str(runs.loc[final, "run_id"].iloc[0]) if final.any() else None,
        "runs_usd": math.fsum(usd0),
        "ledger_usd": math.fsum(l_usd),
        "by_category": by_category,
        "by_phase": _sums(zip(phase, usd0), sorted(set(phase))),
        "by_status": _sums(zip(fates, usd0), FATES),
        "runs": {f: int((fates == f).sum()) for f in FATES},
        "runs_without_cost": int(usd.isna().sum()),
        "ledger_items": len(ledger),
        "device_hours": {u: math.fsum(h.values()) for u, h in hours.items()},
        "device_hours_by_category": {c: {u: hours[u][c] for u in units} for c in CATEGORIES},
        "gpu_hours_total": math.fsum(gpu_by_category.values()),
        "gpu_hours_final": gpu_by_category["final_run"] if has_final else None,
        "gpu_hours_by_category": gpu_by_category,
        "flops_total": math.fsum(flops.fillna(0.0)),
        "flops_final": math.fsum(flops[final].fillna(0.0)) if final.any() else None,
    }


def _sums(pairs: Iterable[tuple[str, float]], names: Iterable[str]) -> dict[str, float]:
    """Exact sum of the values of each name (0.0 for a name without values)."""
    groups: dict[str, list[float]] = {name: [] for name in names}
    for name, value in pairs:
        groups[name].append(float(value))
    return {name: math.fsum(values) for name, values in groups.items()}


def _units(runs: pd.DataFrame) -> pd.Series:
    """The unit each run's device-hours are in: its `device.unit` tag, else GPU for cuda and vCPU for cpu runs,
    else 'device' (a run recorded without device tags)."""
    by_type = runs["tags.device.type"].map({"cuda": "GPU", "cpu": "vCPU"}) if "tags.device.type" in runs else None
    unit = runs["tags.device.unit"] if "tags.device.unit" in runs else pd.Series(None, index=runs.index, dtype=object)
    if by_type is not None:
        unit = unit.fillna(by_type)
    return unit.fillna("device").astype(str)


def _metric(runs: pd.DataFrame, key: str) -> pd.Series:
    """A metric column as floats (NaN where a run lacks it)."""
    return runs[key].astype(float) if key in runs else pd.Series(math.nan, index=runs.index, dtype=float)


def _final_mask(runs: pd.DataFrame, phase: pd.Series, final_run_id: str | None) -> pd.Series:
    """True for the final run: the given id, else the single run tagged phase=final."""
    if final_run_id is not None:
        if "run_id" not in runs or not (runs["run_id"] == final_run_id).any():
            raise ValueError(f"final run {final_run_id!r} is not among the {len(runs)} runs")
        return runs["run_id"] == final_run_id
    final = phase == "final"
    if final.sum() > 1:
        ids = ", ".join(runs.loc[final, "run_id"].astype(str))
        raise ValueError(f"{int(final.sum())} runs are tagged phase=final ({ids}); choose one with final_run_id")
    return final


def round_usd(usd: float) -> float:
    """Dollars rounded for display with the digits they have: to the cent from $1 up, else to 3 significant digits
    (a CPU run's $0.00139 stays $0.00139, never $0)."""
    return round(usd, 2) if abs(usd) >= 1 else float(f"{usd:.3g}")


def _significant(v: float, digits: int) -> float:
    return float(f"{v:.{digits}g}")


def cost_table(result: dict) -> pd.DataFrame:
    """project_cost's result by category, with the total, rounded for display (round_usd; shares and hours to 3 and
    4 significant digits, so a tiny cost keeps its digits): usd, share of total (%), and the device-hours of each
    unit (`GPU_hours`, `vCPU_hours`, ...)."""
    total = result["total_usd"]
    units = list(result["device_hours"])
    rows = [{"category": c, "usd": result["by_category"][c]}
            | {f"{u}_hours": result["device_hours_by_category"][c][u] for u in units} for c in CATEGORIES]
    rows.append({"category": "total", "usd": total} | {f"{u}_hours": result["device_hours"][u] for u in units})
    df = pd.DataFrame(rows, columns=["category", "usd", *(f"{u}_hours" for u in units)])
    df.insert(2, "share_pct", df["usd"] / total * 100 if total else math.nan)
    return df.assign(usd=df["usd"].map(round_usd), share_pct=df["share_pct"].map(lambda v: _significant(v, 3)),
                     **{f"{u}_hours": df[f"{u}_hours"].map(lambda v: _significant(v, 4)) for u in units})


def spend_over_time(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs in the order they ended (running ones at their start) with cumulative dollars, for a plot."""
    columns = ["time", "run_id", "phase", "fate", "usd", "cumulative_usd"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame({"time": runs["end_time"].fillna(runs["start_time"]), "run_id": runs["run_id"],
                       "phase": runs.get("tags.phase"), "fate": runs["fate"],
                       "usd": _metric(runs, "cost/usd").fillna(0.0)})
    df = df.sort_values("time", kind="stable", ignore_index=True)
    df["cumulative_usd"] = df["usd"].cumsum()
    return df[columns]
