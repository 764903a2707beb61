"""GPU energy from NVIDIA's management library (NVML) counters; nothing on machines without it."""

from __future__ import annotations


class GpuEnergy:
    """Energy used by the given CUDA devices since construction, from NVML's total-energy counters (mJ).

    `available` is False (and `kwh()` None) when NVML, a driver or the counter is missing: a CPU-only run
    records no energy rather than a made-up one."""

    def __init__(self, indices: list[int]):
        self._handles, self._start = [], []
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in indices:
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                self._start.append(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
                self._handles.append(handle)
            self._nvml = pynvml
        except Exception:  # no library, no driver, no GPU, or a GPU without the counter (pre-Volta)
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
