"""Shared fixtures: tiny models built from config, saved locally; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

from rl.model import ModelConfig, load_model


class Recorder:
    """A trainer callback that keeps every metric it is given."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.logs.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.logs if key in m]


class Boom:
    """A callback that raises at a given step, after metrics have been produced."""

    def __init__(self, at: int, exc: BaseException):
        self.at, self.exc = at, exc

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.at:
            raise self.exc


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_recorder() -> type[Recorder]:
    return Recorder


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return load_model(ModelConfig(size="nano"), seed=0)
