"""GPU energy from NVIDIA's management library (NVML) counters; nothing on machines without it."""

from __future__ import annotations

import torch


def gpu_uuid(device: torch.device) -> str:
    """NVML's name for a CUDA device ('GPU-<uuid>'): the same GPU whatever CUDA_VISIBLE_DEVICES renumbers."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


class GpuEnergy:
    """Energy used by the GPUs with the given NVML UUIDs since construction, from NVML's total-energy counters (mJ).

    Devices are found by UUID, not index: NVML numbers every GPU of the machine, CUDA only the visible ones.
    `available` is False (and `kwh()` None) when NVML, a driver, a device or the counter is missing: a CPU-only
    run records no energy rather than a made-up one."""

    def __init__(self, uuids: list[str]):
        self.uuids = list(uuids)
        self._handles, self._start = [], []
        try:
            import pynvml

            pynvml.nvmlInit()
            for uuid in uuids:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                self._start.append(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
                self._handles.append(handle)
            self._nvml = pynvml
        except Exception:  # no library, no driver, no such GPU, or a GPU without the counter (pre-Volta)
            self._handles, self._start = [], []
        self.available = bool(self._handles)

    def kwh(self) -> float | None:
        """kWh used since construction, summed over devices; None when unavailable."""
        if not self.available:
            return None
        try:
            mj = sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) - s for h, s in zip(self._handles, self._start))
        except Exception:
            return None
        return mj / 3.6e9  # 1 kWh = 3.6e6 J = 3.6e9 mJ
