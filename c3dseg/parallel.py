"""Threads for NumPy/SciPy work that releases the GIL (whole-volume filters on a few cores).

Every user splits its work into independent jobs whose results do not depend on how many run at
once, so a result never depends on the thread count."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

J = TypeVar("J")
R = TypeVar("R")


def run_jobs(fn: Callable[[J], R], jobs: Iterable[J], threads: int = 1) -> list[R]:
    """``[fn(job) for job in jobs]``, up to ``threads`` at a time (in order)."""
    jobs = list(jobs)
    threads = max(1, min(len(jobs), int(threads or 1)))
    if threads == 1:
        return [fn(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(fn, jobs))


def z_slabs(n: int, parts: int) -> list[tuple[int, int]]:
    """``[z0, z1)`` ranges cutting ``n`` planes into up to ``parts`` slabs of near-equal size."""
    parts = max(1, min(int(parts), int(n)))
    edges = [round(k * n / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
