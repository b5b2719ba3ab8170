"""What every benchmark prints about the machine it ran on: CPU model, core count, load average (at start and at
the end: a busy machine makes the figures meaningless), package versions."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(start_loadavg=None) -> dict:
    """``start_loadavg``: ``os.getloadavg()`` taken when the benchmark started (printed beside the end's)."""
    import jax

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    if start_loadavg is not None:
        info["loadavg_start"] = [round(x, 2) for x in start_loadavg]
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info
