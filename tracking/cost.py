"""Dollar cost from recorded device-seconds and a price table (recomputable later with another table).

A run is billed for its whole wall time on the devices it holds: `compute/device_seconds` is wall seconds x
devices, in the price entry's unit (a GPU, or a vCPU: a CPU run holds every hardware thread of the cores its
torch threads run on). Devices are matched to entries by exact, normalised name; an unknown device is an
error, never a guess.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")
CPU_KEY = "vcpu"  # the entry a CPU run is priced with, per vCPU-hour


class PriceError(ValueError):
    """A price table that cannot be used, or a device it has no price for."""


@dataclass(frozen=True)
class Price:
    """One `[devices.KEY]` entry of a price table."""

    key: str
    usd_per_hour: float
    names: tuple[str, ...]  # device names it prices, as the driver reports them (matched normalised)
    unit: str
    source: str
    date: str
    url: str


def normalise(device_name: str) -> str:
    """A device name reduced for exact matching: 'NVIDIA H100 80GB HBM3' -> 'h100 80gb hbm3'."""
    words = re.sub(r"[^a-z0-9]+", " ", device_name.lower()).split()
    while words and words[0] in ("nvidia", "tesla", "geforce"):
        words = words[1:]
    return " ".join(words)


def load_price_table(path: str | Path | None = None) -> dict[str, Price]:
    """The entries of the price table at `path` (default: the shipped tracking/prices.toml), by key."""
    p = Path(path) if path else DEFAULT_PRICES
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PriceError(f"{p}: cannot read price table: {str(e)[:200] or type(e).__name__}") from None
    devices = data.get("devices", {})
    if not isinstance(devices, dict):
        raise PriceError(f"{p}: [devices] must be a table of [devices.KEY] entries")
    table: dict[str, Price] = {}
    owner: dict[str, str] = {}
    for key, entry in devices.items():
        value = entry.get("usd_per_hour") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise PriceError(f"{p}: devices.{key}.usd_per_hour must be a finite non-negative number")
        names = entry.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and normalise(n) for n in names):
            raise PriceError(f"{p}: devices.{key}.names must be a list of device names")
        for n in names:
            if (other := owner.setdefault(normalise(n), key)) != key:
                raise PriceError(f"{p}: device {n!r} is named by both devices.{other} and devices.{key}")
        table[key] = Price(key, float(value), tuple(names), str(entry.get("unit", "GPU")),
                           str(entry.get("source", "")), str(entry.get("date", "")), str(entry.get("url", "")))
    if not table:
        raise PriceError(f"{p}: no [devices.KEY] entries with usd_per_hour")
    return table


def load_prices(path: str | Path | None = None) -> dict[str, float]:
    """Price key -> US dollars per device-hour, from `path` or the shipped table."""
    return {k: e.usd_per_hour for k, e in load_price_table(path).items()}


def device_key(device_type: str, device_name: str, table: dict[str, Price], price_key: str | None = None) -> str:
    """The price-table key a run on this device is billed with: `price_key` when given (it must exist), 'vcpu'
    on a CPU, else the entry that names the GPU exactly (normalised); an unknown GPU is a PriceError."""
    if price_key is not None:
        if price_key not in table:
            raise PriceError(f"tracking.price_key {price_key!r} is not in the price table; known: "
                             f"{', '.join(sorted(table))}")
        return price_key
    if device_type == "cpu":
        if CPU_KEY not in table:
            raise PriceError(f"the price table has no {CPU_KEY!r} entry (the price of one vCPU-hour)")
        return CPU_KEY
    wanted = normalise(device_name)
    for key, entry in table.items():
        if wanted in {normalise(n) for n in entry.names}:
            return key
    raise PriceError(f"no price for device {device_name!r}: add its name to an entry's names in a price table "
                     f"(tracking.prices), or bill it as a known entry with tracking.price_key (`rlscale prices`)")


def cost_usd(device_seconds: float, device: str, prices: dict[str, float]) -> float:
    """Dollars for `device_seconds` of `device` (a price-table key)."""
    if device not in prices:
        raise PriceError(f"no price for device {device!r}; known: {', '.join(sorted(prices))}")
    return device_seconds / 3600.0 * prices[device]
