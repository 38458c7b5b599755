"""Measuring what a step costs besides time: its peak memory."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SAMPLE_SECONDS = 0.05


@dataclass
class PeakMemory:
    """Peak memory seen while the block ran, in MiB: allocated CUDA memory where training
    runs on a GPU, else the process's resident memory (sampled every 50 ms)."""

    mb: float | None = None


@contextlib.contextmanager
def track_peak_memory(device_type: str) -> Iterator[PeakMemory]:
    peak = PeakMemory()
    if device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        yield peak
        peak.mb = torch.cuda.max_memory_allocated() / 2**20
        return
    import psutil  # an accelerate dependency

    process = psutil.Process()
    highest = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            highest[0] = max(highest[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        highest[0] = max(highest[0], process.memory_info().rss)
        peak.mb = highest[0] / 2**20
