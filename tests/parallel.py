"""Independent, CPU-bound fixture work (training, export, import) run two at a time.

Most of a fixture's export time is the ONNX exporter's tracing: single-threaded Python, so one
process leaves the second core idle. Two fresh (spawned, not forked: torch's thread pools do not
survive a fork) processes of one torch thread each finish a batch of such calls in about half the
time. Each call must be a module-level function whose arguments and result pickle."""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

WORKERS = 2  # the machine's cores (CI's and ours)


def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_two_at_a_time(calls: Sequence[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Each `(function, args)`'s result, in order; the first failure is raised as it was."""
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"), initializer=one_torch_thread) as pool:
        futures = [pool.submit(function, *args) for function, args in calls]
        return [future.result() for future in futures]
