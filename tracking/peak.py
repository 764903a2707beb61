"""Peak FLOP/s of the devices a run holds, for its MFU (model FLOPs utilisation) by phase.

MFU of a phase = its FLOPs / (its seconds x the peak FLOP/s of the devices it used). The seconds the Meter records,
`compute/device_seconds/<phase>`, are device-seconds: wall seconds x the devices the run holds, in the unit it is
billed in (vCPUs on a CPU, its share of each GPU), summed over ranks. So the peaks here are per billed unit (one vCPU,
one GPU) and MFU = FLOPs / (device-seconds x peak per unit), which is FLOPs / (wall seconds x the peak of everything
the run holds): a run billed 1/k of a GPU is held to 1/k of its peak, a CPU run to its vCPUs' share of the peak.

A GPU's peak is its vendor's dense figure (no sparsity) for the run's dtype, fp32 without TF32 (torch's default
for float32 matmuls), matched by exact normalised name as prices are. A CPU's is measured, its equivalent of a
datasheet peak: the best rate of square matmuls in the run's dtype on the run's torch threads (what the BLAS
reaches, not the theoretical FMA rate), divided by the vCPUs those threads hold, and cached per host in
`<cache>/peak_flops.json` ($RLSCALE_CACHE, else ~/.cache/rlscale) by CPU model, vector instructions (a cloud VM
that moves to a host without AVX512 keeps its model name), torch version, threads and dtype, so
a run pays about a second once. A measurement taken while other work loads the machine reads low (MFU then reads
high): delete the cache file to measure again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlscale.tracking.cost import normalise

CACHE_NAME = "peak_flops.json"
GEMM_SIZES = (256, 512, 1024, 2048, 4096)  # n of the square matmuls timed, smallest first
GEMM_SECONDS = 1.0  # time budget of one CPU measurement
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s of one billed unit (one GPU, one vCPU) and where the figure comes from."""

    flops: float
    source: str  # the datasheet's URL, or "measured: ..."


@dataclass(frozen=True)
class GpuPeak:
    """One GPU model's dense peaks by dtype (TFLOP/s) as its datasheet gives them."""

    names: tuple[str, ...]  # as the driver reports them (torch.cuda.get_device_name), matched normalised
    tflops: dict[str, float]  # float32 (no TF32), bfloat16 and float16 (fp32 accumulate)
    source: str  # the datasheet's URL


_H100 = "https://www.nvidia.com/en-us/data-center/h100/"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_A100 = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
         "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")


def _dense(fp32: float, half: float | None) -> dict[str, float]:
    """A peak entry: fp32 and one tensor-core figure for bf16 and fp16 (TFLOP/s, dense); `half` None: no bf16."""
    return {"float32": fp32} | ({"bfloat16": half, "float16": half} if half is not None else {})


# Dense figures: the datasheets print the tensor-core peaks "with sparsity", twice the dense rate; halved here.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak(("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"), _dense(67.0, 1979 / 2), _H100),
    GpuPeak(("NVIDIA H100 PCIe",), _dense(51.0, 1513 / 2), _H100),
    GpuPeak(("NVIDIA H100 NVL",), _dense(60.0, 1671 / 2), _H100),
    GpuPeak(("NVIDIA H200",), _dense(67.0, 1979 / 2), _H200),
    GpuPeak(("NVIDIA H200 NVL",), _dense(60.0, 1671 / 2), _H200),
    GpuPeak(("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
            _dense(19.5, 312.0), _A100),
    GpuPeak(("NVIDIA L40S",), _dense(91.6, 362.05), "https://www.nvidia.com/en-us/data-center/l40s/"),
    GpuPeak(("NVIDIA L4",), _dense(30.3, 242 / 2), "https://www.nvidia.com/en-us/data-center/l4/"),
    GpuPeak(("NVIDIA A10",), _dense(31.2, 125.0), "https://www.nvidia.com/en-us/data-center/products/a10-gpu/"),
    # AWS's A10G has no NVIDIA datasheet; its figures as tabulated against the A10's
    GpuPeak(("NVIDIA A10G",), _dense(31.52, 70.0), "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/"),
    GpuPeak(("NVIDIA GeForce RTX 4090",), _dense(82.6, 165.2),  # fp32 accumulate (330.3 with fp16 accumulate)
            "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"),
    GpuPeak(("Tesla T4",), {"float32": 8.1, "float16": 65.0},
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"),
    GpuPeak(("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"), {"float32": 15.7, "float16": 125.0},
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"),
)


class PeakError(ValueError):
    """No peak is known for the device and dtype a run used."""


def gpu_peak(name: str, dtype: str) -> Peak:
    """The datasheet peak of the GPU `name` (as the driver reports it) in `dtype`; PeakError when not listed."""
    wanted = normalise(name)
    for entry in GPU_PEAKS:
        if wanted in {normalise(n) for n in entry.names}:
            if dtype not in entry.tflops:
                raise PeakError(f"no {dtype} peak for GPU {name!r} in tracking/peak.py")
            return Peak(entry.tflops[dtype] * 1e12, entry.source)
    raise PeakError(f"no peak for GPU {name!r} in tracking/peak.py")


def gemm_flops(dtype: torch.dtype, seconds: float = GEMM_SECONDS, sizes: tuple[int, ...] = GEMM_SIZES
               ) -> tuple[float, int]:
    """The best rate (FLOP/s) of square `n x n` matmuls in `dtype` on torch's current threads, and its n: each size
    from the smallest timed for its share of `seconds` (a warm-up, then at least twice, the fastest kept), larger
    sizes while the next one still fits in what is left of `seconds`."""
    deadline = time.perf_counter() + seconds
    best, best_n = 0.0, 0
    for i, n in enumerate(sizes):
        a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
        out = torch.mm(a, b)
        until = time.perf_counter() + seconds / len(sizes)
        fastest, runs = math.inf, 0
        while runs < 2 or time.perf_counter() < until:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            fastest, runs = min(fastest, time.perf_counter() - t0), runs + 1
        if 2.0 * n**3 / fastest > best:
            best, best_n = 2.0 * n**3 / fastest, n
        if i + 1 < len(sizes) and 3 * fastest * (sizes[i + 1] / n) ** 3 > deadline - time.perf_counter():
            break  # a warm-up and two runs of the next size would not fit
    return best, best_n


def cache_file() -> Path:
    """Where measured CPU peaks are kept: `peak_flops.json` under $RLSCALE_CACHE, else ~/.cache/rlscale."""
    return Path(os.environ.get("RLSCALE_CACHE") or Path.home() / ".cache" / "rlscale") / CACHE_NAME


def cpu_peak(cpu_name: str, dtype: str, vcpus: float, path: Path | None = None) -> Peak:
    """The GEMM peak per vCPU of this host in `dtype` on torch's current threads, which hold `vcpus`: measured once
    (`gemm_flops`) and cached in `path` (default `cache_file()`) under the CPU model, its vector instructions as torch
    sees them, torch version, threads and dtype."""
    path = path or cache_file()
    threads = torch.get_num_threads()
    isa = torch.backends.cpu.get_cpu_capability()  # AVX512 or AVX2...: a VM's model name can stay when it changes
    key = f"{cpu_name} | {isa} | torch {torch.__version__} | {threads} threads | {dtype}"
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        cache = {}
    except (OSError, ValueError):
        cache = None
    ours = isinstance(cache, dict) and not path.is_symlink()  # anything else there is not replaced
    cache = cache if ours else {}
    try:
        rate, n = float(cache[key]["flops"]), int(cache[key]["n"])
    except (KeyError, TypeError, ValueError):
        rate, n = gemm_flops(DTYPES[dtype])
        cache[key] = {"flops": rate, "n": n, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not ours:
            return Peak(rate / vcpus, f"measured: {dtype} GEMM {rate:.3g} FLOP/s (n={n}) on {threads} torch threads "
                                      f"= {vcpus:g} vCPUs of {cpu_name}; not cached: {path} is not rlscale's cache")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(f.name, path)  # whole or not at all; a concurrent writer's entry may be lost (measured again)
    return Peak(rate / vcpus, f"measured: {dtype} GEMM {rate:.3g} FLOP/s (n={n}) on {threads} torch threads "
                              f"= {vcpus:g} vCPUs of {cpu_name} ({isa}), torch {torch.__version__}; cached in {path}")


def device_peak(tags: dict[str, str]) -> Peak:
    """The peak per billed unit of a run's device from its tags (`device.type`, `device.name`, `device.dtype`, and
    on a CPU `device.threads_vcpus`, the vCPUs its torch threads hold alone): a GPU's datasheet figure, a CPU's
    measured one per vCPU."""
    kind, name, dtype = tags.get("device.type", "cpu"), tags.get("device.name", ""), tags.get("device.dtype", "float32")
    if kind == "cuda":
        return gpu_peak(name, dtype)
    return cpu_peak(name, dtype, float(tags.get("device.threads_vcpus") or torch.get_num_threads()))


def perf_metrics(metrics: dict[str, float], peak: float, devices: float) -> dict[str, float]:
    """A run's `perf/*` metrics from its cumulative compute metrics, `peak` FLOP/s per billed unit and the `devices`
    units it holds: `perf/peak_flops` (of everything it holds), and for each phase with FLOPs and seconds
    `perf/mfu/<phase>` and `perf/flops_per_second/<phase>` (while the phase ran), and the whole run's `perf/mfu`
    (its FLOPs over all the time it was billed for)."""
    out = {"perf/peak_flops": peak * devices}
    for key, flops in metrics.items():
        phase = key.removeprefix("compute/flops/")
        seconds = metrics.get(f"compute/device_seconds/{phase}", 0.0)  # none for compute/flops/lineage
        if phase != key and flops > 0 and seconds > 0:
            out[f"perf/mfu/{phase}"] = flops / (seconds * peak)
            out[f"perf/flops_per_second/{phase}"] = flops * devices / seconds
    if metrics.get("compute/flops", 0.0) > 0 and metrics.get("compute/device_seconds", 0.0) > 0:
        out["perf/mfu"] = metrics["compute/flops"] / (metrics["compute/device_seconds"] * peak)
    return out
