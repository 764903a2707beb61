"""MFU by phase (`perf/*` metrics at the peak of tracking/peak.py) and benchmarks/gpu_check.py's smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny import write_tiny

from rlscale.experiments.cli_common import Quiet
from rlscale.experiments.config import load_config
from rlscale.experiments.runner import run_experiment
from rlscale.tracking import peak
from rlscale.tracking.cost import normalise
from rlscale.tracking.run import TrackedRun, tracking_uri

REAL_GEMM_FLOPS = peak.gemm_flops  # taken at import, before conftest's fixture replaces it
REPO = Path(__file__).resolve().parent.parent
H200 = "https://www.nvidia.com/en-us/data-center/h200/"


def test_gpu_peaks_come_from_the_datasheet_table():
    h200 = peak.gpu_peak("NVIDIA H200", "bfloat16")
    assert h200.flops == pytest.approx(989.5e12) and h200.source == H200
    assert peak.gpu_peak("NVIDIA H100 80GB HBM3", "float32").flops == pytest.approx(67e12)
    assert peak.gpu_peak("nvidia a100-sxm4-80gb", "float16").flops == pytest.approx(312e12)  # matched normalised
    assert peak.gpu_peak("NVIDIA L4", "bfloat16").flops == pytest.approx(121e12)
    with pytest.raises(peak.PeakError, match="no bfloat16 peak for GPU 'Tesla T4'"):
        peak.gpu_peak("Tesla T4", "bfloat16")
    with pytest.raises(peak.PeakError, match="no peak for GPU 'NVIDIA B300'"):
        peak.gpu_peak("NVIDIA B300", "bfloat16")
    names = [normalise(n) for e in peak.GPU_PEAKS for n in e.names]
    assert len(names) == len(set(names))  # a GPU has one entry
    for e in peak.GPU_PEAKS:  # sourced; tensor cores beat plain fp32
        assert e.source.startswith("https://") and 0 < e.tflops["float32"] < e.tflops.get("float16", 1e9)


def test_cpu_peak_is_measured_once_per_key_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(peak, "gemm_flops", REAL_GEMM_FLOPS)  # conftest fixes it for every other test
    path = tmp_path / "peak_flops.json"
    vcpus = 2.0
    first = peak.cpu_peak("Test CPU", "float32", vcpus, path)  # a real measurement, about a second
    assert first.flops * vcpus > 1e8 and first.source.startswith("measured: float32 GEMM")
    calls = []
    monkeypatch.setattr(peak, "gemm_flops", lambda dtype: calls.append(dtype) or (4e9, 256))
    assert peak.cpu_peak("Test CPU", "float32", vcpus, path) == first and not calls  # read back, not measured
    assert peak.cpu_peak("Test CPU", "bfloat16", vcpus, path).flops == pytest.approx(4e9 / vcpus)
    assert calls == [torch.bfloat16]
    keys = json.loads(path.read_text())
    assert len(keys) == 2 and all(f"| {torch.get_num_threads()} threads |" in k for k in keys)
    # the same model name on a host with other vector instructions (a VM moved off AVX512): measured again
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert peak.cpu_peak("Test CPU", "float32", vcpus, path).flops == pytest.approx(4e9 / vcpus)
    assert calls == [torch.bfloat16, torch.float32] and len(json.loads(path.read_text())) == 3


def test_perf_metrics_are_flops_over_seconds_at_the_peak():
    m = {"compute/flops": 6e12, "compute/flops/sft": 4e12, "compute/flops/policy": 2e12, "compute/flops/reference": 0.0,
         "compute/flops/lineage": 9e12, "compute/device_seconds": 40.0, "compute/device_seconds/sft": 10.0,
         "compute/device_seconds/policy": 20.0, "compute/device_seconds/reference": 0.0,
         "compute/device_seconds/other": 10.0}
    out = peak.perf_metrics(m, 1e12, 0.5)  # half a GPU of 1 TFLOP/s: 10 device-seconds are 20 s of wall time
    assert out == pytest.approx({"perf/peak_flops": 5e11, "perf/mfu/sft": 0.4, "perf/flops_per_second/sft": 2e11,
                                 "perf/mfu/policy": 0.1, "perf/flops_per_second/policy": 5e10, "perf/mfu": 0.15})


def test_tracked_run_logs_perf_at_its_end_failed_or_without_a_peak(tmp_path):
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    compute = {"compute/flops": 2e15, "compute/flops/policy": 1e15, "compute/device_seconds": 10.0,
               "compute/device_seconds/policy": 4.0}

    def run(name: str, fail: bool) -> str:
        tags = {"device.type": "cuda", "device.name": name, "device.dtype": "bfloat16"}
        with pytest.raises(RuntimeError) if fail else nullcontext():
            with TrackedRun(client, "perf", name, tags, {}, "h200", {"h200": 3.79},
                            root=tmp_path / "mlruns", devices=0.5) as tracked:
                tracked.on_log(1, compute)
                if fail:
                    raise RuntimeError("injected")
        return tracked.run_id

    failed = client.get_run(run("NVIDIA H200", fail=True))
    m = failed.data.metrics
    assert failed.info.status == "FAILED" and failed.data.tags["perf.peak_source"] == H200
    assert m["perf/peak_flops"] == pytest.approx(0.5 * 989.5e12)  # half of the GPU: half its peak
    assert m["perf/mfu/policy"] == pytest.approx(1e15 / (4.0 * 989.5e12))
    unknown = client.get_run(run("NVIDIA B300", fail=False))
    assert unknown.info.status == "FINISHED" and not any(k.startswith("perf/") for k in unknown.data.metrics)
    assert unknown.data.tags["perf.peak_source"].startswith("none: no peak for GPU 'NVIDIA B300'")


def test_tiny_run_logs_mfu_for_each_phase_with_compute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RLSCALE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(write_tiny(tmp_path, sft_steps=2), ["sft.reuse=false", "grpo.eval_every=0"])
    result = run_experiment(cfg, Quiet())
    run = MlflowClient(tracking_uri(None, tmp_path / "mlruns")).get_run(result.run_id)
    m = run.data.metrics
    phases = {k.removeprefix("compute/flops/") for k, v in m.items()
              if k.startswith("compute/flops/") and k != "compute/flops/lineage" and v > 0}
    assert phases == {"sft", "rollout", "verify_rollout", "policy", "eval"}
    assert {k.removeprefix("perf/mfu/") for k in m if k.startswith("perf/mfu/")} == phases  # none without compute
    assert m["perf/peak_flops"] > 0 and run.data.tags["perf.peak_source"].startswith("measured: float32 GEMM")
    assert run.data.tags["device.dtype"] == "float32" and float(run.data.tags["device.threads_vcpus"]) >= 1
    for p in phases:
        assert 0 < m[f"perf/mfu/{p}"] <= 1, p
        assert m[f"perf/flops_per_second/{p}"] == pytest.approx(m[f"perf/mfu/{p}"] * m["perf/peak_flops"])
    assert (tmp_path / "cache" / "peak_flops.json").is_file()


def test_gpu_check_smoke_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"RLSCALE_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and list(data["configs"]) == ["tiny", "smollm2", "gpu_qwen"]
    tiny = data["configs"]["tiny"]
    assert tiny["status"] == "ok" and tiny["dtype"] == "float32" and tiny["sft_steps"] == 2 and tiny["flops"] > 0
    assert set(tiny["tokens_per_second"]) == {"sft", "rollout+verify_rollout", "policy"}
    assert all(0 < v < 1e7 for v in tiny["tokens_per_second"].values())
    assert set(tiny["mfu"]) == {"sft", "rollout", "verify_rollout", "policy", "eval"}
    assert all(0 < v <= 1 for v in tiny["mfu"].values()) and 0 < tiny["mfu_run"] <= 1
    assert tiny["peak_flops"] > 0 and tiny["peak_source"].startswith("measured:")
    assert tiny["price"]["key"] == "vcpu" and tiny["usd"] == pytest.approx(
        tiny["device_seconds"] / 3600 * tiny["price"]["usd_per_hour"])
    assert tiny["peak_gpu_memory_bytes"] is None and 0 < tiny["wall_seconds"] < 300
    for name in ("smollm2", "gpu_qwen"):
        assert data["configs"][name]["status"] == "skipped" and "smoke mode" in data["configs"][name]["reason"]
    if not (REPO / "models" / "Qwen2.5-0.5B-Instruct" / "config.json").is_file():
        assert "weights are not on this machine" in data["configs"]["gpu_qwen"]["reason"]


def test_cpu_peak_never_replaces_a_file_that_is_not_its_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(peak, "gemm_flops", lambda dtype: (4e9, 256))
    user = tmp_path / "notes.txt"
    user.write_text("my notes, not JSON")
    link = tmp_path / "link.json"
    link.symlink_to(user)
    for path in (user, link):
        got = peak.cpu_peak("Test CPU", "float32", 2.0, path)
        assert got.flops == pytest.approx(2e9) and "not cached" in got.source
    assert user.read_text() == "my notes, not JSON" and link.is_symlink()
