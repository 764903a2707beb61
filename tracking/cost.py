"""Dollar cost from recorded device-seconds and a price table (recomputable later with another table)."""

from __future__ import annotations

import tomllib
from pathlib import Path

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")


class PriceError(ValueError):
    """A price table that cannot be used."""


def load_prices(path: str | Path | None = None) -> dict[str, float]:
    """Device name -> US dollars per device-hour, from `path` or the shipped table."""
    p = Path(path) if path else DEFAULT_PRICES
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PriceError(f"{p}: cannot read price table: {e}") from None
    prices = {}
    for name, entry in data.get("devices", {}).items():
        value = entry.get("usd_per_hour") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise PriceError(f"{p}: devices.{name}.usd_per_hour must be a non-negative number")
        prices[name] = float(value)
    if not prices:
        raise PriceError(f"{p}: no [devices.NAME] entries with usd_per_hour")
    return prices


def device_key(device_type: str, device_name: str = "") -> str:
    """The price-table key for a device: 'cpu_core' on a CPU, else the GPU family from its name."""
    if device_type == "cpu":
        return "cpu_core"
    name = device_name.lower()
    for key in ("h800", "h200", "h100", "a100", "l4"):
        if key in name:
            return key
    return "h100"


def cost_usd(device_seconds: float, device: str, prices: dict[str, float]) -> float:
    """Dollars for `device_seconds` of `device` (a price-table key)."""
    if device not in prices:
        raise PriceError(f"no price for device {device!r}; known: {', '.join(sorted(prices))}")
    return device_seconds / 3600.0 * prices[device]
