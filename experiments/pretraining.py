"""The base model's pretraining, the first ancestor in a run's cost lineage: declared, never guessed silently.

A config declares it (`model.pretrain_tokens`, optional `model.pretrain_flops` / `model.pretrain_usd`, always with
`model.pretrain_source`), or the model is one the sourced table `experiments/data/pretraining.toml` lists (matched by
a substring of `model.path`); otherwise nothing is recorded and the report says so.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlscale.rl.model import ModelConfig

TABLE = Path(__file__).with_name("data") / "pretraining.toml"


@lru_cache(maxsize=8)
def load_table(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    """The table's entries, checked: each has `match` (non-empty strings), `tokens` > 0 and a `source`."""
    entries = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("model", [])
    for i, e in enumerate(entries):
        where = f"{path}: model[{i}]"
        match = e.get("match")
        if not isinstance(match, list) or not match or not all(isinstance(m, str) and m.strip() for m in match):
            raise ValueError(f"{where}: match must be a non-empty list of non-empty strings")
        tokens = e.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int | float) or not tokens > 0:
            raise ValueError(f"{where}: tokens must be a number > 0")
        if not isinstance(e.get("source"), str) or not e["source"].strip():
            raise ValueError(f"{where}: source (a URL and the quoted statement) is required")
    return tuple(entries)


def table_entry(model_path: str | None, path: Path = TABLE) -> dict[str, Any] | None:
    """The table entry whose match string occurs in `model_path` (case-insensitive; the longest match wins), or None."""
    if not model_path:
        return None
    lowered = model_path.lower()
    hits = [(len(m), e) for e in load_table(path) for m in e["match"] if m.lower() in lowered]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def pretraining(model_cfg: ModelConfig, n_params: int, table: Path = TABLE) -> dict[str, Any] | None:
    """What a run records about its base model's pretraining: {"metrics": {...}, "tags": {...}}, or None when
    nothing is declared. The config's own declaration wins over the table; FLOPs are the declared
    `pretrain_flops`, else 6 * n_params * tokens (n_params: the base model's parameter count, all its weights)."""
    tokens: float | None
    flops: float | None
    usd: float | None
    if model_cfg.pretrain_tokens is not None or model_cfg.pretrain_flops is not None:
        tokens, flops, usd = model_cfg.pretrain_tokens, model_cfg.pretrain_flops, model_cfg.pretrain_usd
        source = model_cfg.pretrain_source or ""
    elif (entry := table_entry(model_cfg.path, table)) is not None:
        tokens, flops, usd, source = entry["tokens"], None, None, entry["source"].strip()
    else:
        return None
    flops_from = "declared" if flops is not None else "6ND"
    if flops is None:
        if n_params <= 0:
            raise ValueError(f"pretraining FLOPs as 6ND need the model's parameter count (got n_params={n_params})")
        flops = 6.0 * n_params * float(tokens)  # type: ignore[arg-type]
    metrics: dict[str, float] = {"pretrain/flops": float(flops)}
    if tokens is not None:
        metrics["pretrain/tokens"] = float(tokens)
    if usd is not None:
        metrics["pretrain/usd"] = float(usd)
    return {"metrics": metrics, "tags": {"pretrain.source": source, "pretrain.flops_from": flops_from}}
