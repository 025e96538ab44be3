"""What the health report shows about the hardware: NVML per GPU when present, else CPU/RAM."""

from __future__ import annotations

import functools
from typing import Any

import psutil
import torch

__all__ = ["device_name", "memory_snapshot", "peak_flops", "read_devices"]

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


@functools.cache
def _nvml_init() -> None:
    """Once per process: NVML's init is not free, and this runs every logged step."""
    import pynvml

    pynvml.nvmlInit()


def read_devices() -> list[dict[str, Any]]:
    """One dict per GPU on this node (util, memory, temperature) or one for the CPU."""
    if torch.cuda.is_available():
        try:
            import pynvml

            _nvml_init()
            devices = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                devices.append(
                    {
                        "index": index,
                        "util_pct": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        "mem_used_gb": mem.used / 1e9,
                        "mem_total_gb": mem.total / 1e9,
                        "temp_c": float(
                            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                        ),
                    }
                )
            return devices
        except Exception:  # NVML missing or unsupported: fall through to what torch knows
            return [
                {
                    "index": i,
                    "mem_used_gb": torch.cuda.memory_reserved(i) / 1e9,
                    "mem_total_gb": torch.cuda.get_device_properties(i).total_memory / 1e9,
                }
                for i in range(torch.cuda.device_count())
            ]
    vm = psutil.virtual_memory()
    return [
        {
            "index": "cpu",
            "cpu_pct": psutil.cpu_percent(interval=None),
            "mem_used_gb": (vm.total - vm.available) / 1e9,
            "mem_total_gb": vm.total / 1e9,
        }
    ]


def memory_snapshot() -> dict[str, float]:
    """This rank's memory in GB: host RSS and, on a GPU, allocated, peak allocated and peak
    reserved (the caching allocator's pool: what the GPU cannot give to anything else)."""
    out = {"rss_gb": psutil.Process().memory_info().rss / 1e9}
    if torch.cuda.is_available():
        out["gpu_allocated_gb"] = torch.cuda.memory_allocated() / 1e9
        out["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["gpu_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return out
