"""What every benchmark here prints: the machine it ran on, and each timing as the median of
several runs after a warm-up, with its spread, so that a figure can be checked by running the
command again."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


#: the benchmarks' data: MNIST's 28 × 28 grey-scale images
MNIST_SHAPE = (1, 28, 28)


def machine() -> str:
    """Cores this process may use, torch's threads, the CPU model, torch and Python versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"machine: {cores()} cores ({model}), torch {torch.__version__} with {torch.get_num_threads()} threads"
            f"{gpu}, Python {platform.python_version()}")


@dataclass
class Timing:
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def __str__(self) -> str:
        return f"{self.median:.4g} s (median of {len(self.runs)}; {min(self.runs):.4g}–{max(self.runs):.4g})"


def timed(fn, repeats: int = 3, warmup: int = 1) -> tuple[Timing, object]:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; the timing and the
    last result."""
    if repeats < 1:
        raise ValueError(f"--repeats: got {repeats}; accepted: an integer >= 1")
    for _ in range(warmup):
        fn()
    runs, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return Timing(runs), out
