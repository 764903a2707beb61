"""What the whole project cost, beyond the final run: every recorded run plus a ledger of costs MLflow never saw.

Every run is billed once, for its own work (`cost/usd`, `compute/flops`): a shared SFT run is its own run, billed
once however many RL runs start from it. `compute/flops/lineage` and `cost/usd_lineage` (a run's own plus its
ancestors') and the declared `pretrain/*` numbers describe one model's lineage and are never summed into totals.
"""

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
LINEAGE_FLOPS, LINEAGE_USD = "compute/flops/lineage", "cost/usd_lineage"  # own + ancestors': never summed
PRETRAIN_FLOPS, PRETRAIN_TOKENS, PRETRAIN_USD = "pretrain/flops", "pretrain/tokens", "pretrain/usd"  # declared
NOT_RL_FLOPS = ("compute/flops/sft", "compute/flops/eval")  # a run's compute that is not RL training

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


def project_cost(runs: pd.DataFrame, ledger: pd.DataFrame | None = None, final_run_id: str | None = None,
                 ancestors: pd.DataFrame | None = None) -> dict:
    """Total cost of the project, every run (any fate) plus every ledger item, as a JSON-ready dict.

    The final run is `final_run_id`, else the one run tagged phase=final; it is category final_run and every other
    run prior_runs. A run without `cost/usd` counts 0 (and in runs_without_cost). Each run counts once, for its own
    `cost/usd` and `compute/flops` (a run listed twice is counted once; lineage and pretraining metrics never enter a
    total). Device-hours are kept apart by unit (`device_hours`: GPU, vCPU, from each run's `device.unit` /
    `device.type` tag; ledger gpu_hours are GPU); `gpu_hours_*` count GPUs only. Sums are exact (math.fsum);
    by_phase and by_status cover the runs only, so they add up to runs_usd.

    `final_lineage` is the final run's model's lineage (`lineage`, with its ratios to the project's runs), and
    `pretraining` the project's compute against each declared pretraining (`pretraining_shares`); `ancestors` are
    runs outside `runs` (another experiment) that the lineage may name, never billed here."""
    if len(runs) and not {"run_id", "fate"} <= set(runs.columns):
        raise ValueError("runs need the columns run_id and fate: load them with analysis.runs.load_runs")
    if len(runs):
        runs = runs.drop_duplicates("run_id", ignore_index=True)
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
    line = None
    if final.any():
        line = lineage(runs, str(runs.loc[final, "run_id"].iloc[0]), ancestors)
        project = {"usd": math.fsum(usd0), "flops": math.fsum(flops.fillna(0.0))}
        line["project"] = project | {"runs": len(runs)}
        line["ratios"] = {f"{a}_to_{b}": {k: _ratio(line[a][k], (line[b] if b != "project" else project)[k])
                                          for k in ("usd", "flops")}
                          for a, b in (("final", "lineage"), ("final", "project"), ("lineage", "project"))}
    return {
        "total_usd": total,
        "final_run_usd": final_usd,
        "ratio_total_to_final": total / final_usd if final_usd else None,
        "final_run_id": str(runs.loc[final, "run_id"].iloc[0]) if final.any() else None,
        "runs_usd": math.fsum(usd0),
        "ledger_usd": math.fsum(l_usd),
        "by_category": by_category,
        "by_phase": _sums(zip(phase, usd0), sorted(set(phase))),
        "runs_by_phase": {k: int(v) for k, v in sorted(phase.value_counts().items())},
        "runs_from_shared_sft": int(runs["tags.sft.run_id"].notna().sum()) if "tags.sft.run_id" in runs else 0,
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
        "final_lineage": line,
        "pretraining": pretraining_shares(runs, line),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _float(row: dict, key: str) -> float | None:
    """A run's metric as a float, None when absent or not finite."""
    try:
        v = float(row.get(key))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text(row: dict, key: str) -> str | None:
    v = row.get(key)
    return v if isinstance(v, str) and v else None


def missing_ancestors(runs: pd.DataFrame, run_id: str, known: pd.DataFrame | None = None) -> list[str]:
    """The ancestor run ids (tag `sft.run_id`, followed up the chain) of `run_id` that neither `runs` nor `known`
    hold: the runs to fetch from the store (another experiment) before `lineage` can name them."""
    pool = pd.concat([runs, known]) if known is not None and len(known) else runs
    by_id = {r["run_id"]: r for r in pool.to_dict("records")} if len(pool) else {}
    seen, rid = set(), run_id
    while rid in by_id and rid not in seen:
        seen.add(rid)
        rid = _text(by_id[rid], "tags.sft.run_id")
    return [rid] if rid is not None and rid not in by_id else []


def _pretraining_of(row: dict) -> dict | None:
    """The pretraining a run declares (metrics `pretrain/*`, tags `pretrain.*`), or None."""
    flops = _float(row, PRETRAIN_FLOPS)
    if flops is None or flops <= 0:
        return None
    params = _float(row, "tags.model.params")
    return {"model": _text(row, "tags.model.name"), "params": params, "flops": flops,
            "tokens": _float(row, PRETRAIN_TOKENS), "usd": _float(row, PRETRAIN_USD),
            "source": _text(row, "tags.pretrain.source"), "flops_from": _text(row, "tags.pretrain.flops_from")}


def lineage(runs: pd.DataFrame, run_id: str, ancestors: pd.DataFrame | None = None) -> dict:
    """What it took to produce the model of run `run_id`: its ancestors (the shared SFT run it started from, tag
    `sft.run_id`, followed up the chain) and itself, oldest first, each with its own FLOPs and dollars, and the
    base model's pretraining when a run of the chain declares it (never guessed). `lineage` sums the runs (each its
    own work; pretraining apart, in `with_pretraining`); an ancestor not in the store is taken from the run's
    recorded `compute/flops/lineage` / `cost/usd_lineage` and named in `missing`. A run that trained its own SFT
    (no `sft.run_id`) is its own lineage; its SFT share is `own_sft_flops`."""
    pool = pd.concat([runs, ancestors]) if ancestors is not None and len(ancestors) else runs
    by_id = {r["run_id"]: r for r in pool.drop_duplicates("run_id").to_dict("records")}
    in_project = set(runs["run_id"]) if "run_id" in runs else set()
    chain, seen, missing, rid = [], set(), [], run_id
    while rid is not None and rid not in seen:
        seen.add(rid)
        if rid not in by_id:
            missing.append(rid)
            break
        chain.append(by_id[rid])
        rid = _text(by_id[rid], "tags.sft.run_id")
    chain.reverse()
    steps = []
    for i, row in enumerate(chain):
        phase = _text(row, "tags.phase")
        kind = "final run" if i == len(chain) - 1 else "shared SFT" if phase == "sft" else f"ancestor ({phase})"
        steps.append({"kind": kind, "run_id": row["run_id"], "run_name": _text(row, "run_name"),
                      "experiment": _text(row, "experiment"), "fate": _text(row, "fate"),
                      "in_project": row["run_id"] in in_project,
                      "flops": _float(row, "compute/flops") or 0.0, "usd": _float(row, "cost/usd") or 0.0})
    final = chain[-1]
    recorded = {"flops": _float(final, LINEAGE_FLOPS), "usd": _float(final, LINEAGE_USD)}
    total = {k: math.fsum(s[k] for s in steps) for k in ("usd", "flops")}
    if missing:  # the missing ancestors' share as the run recorded it (own + ancestors' at the time)
        total = {k: recorded[k] if recorded[k] is not None else total[k] for k in total}
    pretraining = next((p for p in map(_pretraining_of, reversed(chain)) if p), None)
    with_pretraining = None
    if pretraining:
        with_pretraining = {"flops": total["flops"] + pretraining["flops"],
                            "usd": total["usd"] + pretraining["usd"] if pretraining["usd"] is not None else None}
    sft = _float(final, "compute/flops/sft")
    sweep = {k.removeprefix("tags.sweep."): final[k] for k in ("tags.sweep.study", "tags.sweep.parent_run_id",
                                                               "tags.sweep.best_trial", "tags.sweep.best_run_id")
             if _text(final, k)} or None
    sweep_cost = None
    if sweep and "parent_run_id" in sweep and "parent_run_id" in runs:  # the trials of the sweep, as billed
        trials = runs[runs["parent_run_id"] == sweep["parent_run_id"]]
        sweep_cost = {"runs": len(trials), "usd": math.fsum(_metric(trials, "cost/usd").fillna(0.0)),
                      "flops": math.fsum(_metric(trials, "compute/flops").fillna(0.0))}
    return {"run_id": run_id, "steps": steps, "missing": missing,
            "final": {"usd": steps[-1]["usd"], "flops": steps[-1]["flops"]}, "lineage": total,
            "recorded": recorded, "own_sft_flops": sft if sft and len(chain) == 1 else None,
            "pretraining": pretraining, "with_pretraining": with_pretraining, "sweep": sweep,
            "sweep_cost": sweep_cost}


def pretraining_shares(runs: pd.DataFrame, final_lineage: dict | None = None) -> dict:
    """The project's compute and cost against each declared pretraining (never guessed: a run declares it with
    `pretrain/flops`, tags `pretrain.source` and `pretrain.flops_from`): per distinct declaration, the runs on that
    base model (a shared SFT run that declares nothing counts with the runs that start from it), their FLOPs (each
    run once, its own), the RL part of them (less SFT and evals) and dollars, each as a share of the pretraining's
    FLOPs (and of its declared dollars); plus the final model's lineage (pretraining excluded) against its own.
    `declared` is empty when no run declares any."""
    rows = runs.to_dict("records") if len(runs) else []
    own = {r["run_id"]: _pretraining_of(r) for r in rows}
    inherited = {}
    for r in rows:  # a shared SFT run carries the declaration of the runs started from it
        parent = _text(r, "tags.sft.run_id")
        if own[r["run_id"]] and parent in own and not own[parent]:
            inherited.setdefault(parent, own[r["run_id"]])
    groups: dict[tuple, dict] = {}
    undeclared = 0
    for r in rows:
        p = own[r["run_id"]] or inherited.get(r["run_id"])
        if p is None:
            undeclared += _float(r, "compute/flops") is not None
            continue
        g = groups.setdefault((p["flops"], p["source"], p["model"]), p | {"runs": 0, "run_flops": [], "rl_flops": [],
                                                                            "run_usd": []})
        flops = _float(r, "compute/flops") or 0.0
        g["runs"] += 1
        g["run_flops"].append(flops)
        g["rl_flops"].append(max(0.0, flops - sum(_float(r, k) or 0.0 for k in NOT_RL_FLOPS)))
        g["run_usd"].append(_float(r, "cost/usd") or 0.0)
    declared = []
    for g in groups.values():
        g |= {k: math.fsum(g[k]) for k in ("run_flops", "rl_flops", "run_usd")}
        g["share_flops"], g["share_rl_flops"] = g["run_flops"] / g["flops"], g["rl_flops"] / g["flops"]
        g["share_usd"] = _ratio(g["run_usd"], g["usd"])
        declared.append(g)
    final = None
    if final_lineage and final_lineage["pretraining"]:
        p, line = final_lineage["pretraining"], final_lineage["lineage"]
        final = {"flops": line["flops"], "usd": line["usd"], "share_flops": line["flops"] / p["flops"],
                 "share_usd": _ratio(line["usd"], p["usd"]), "pretraining": p}
    return {"declared": sorted(declared, key=lambda g: -g["runs"]), "undeclared_runs": undeclared,
            "final_lineage": final}


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
