"""The Dask side of blockwise runs: the cluster, passes over blocks, completion records, resume.

A *pass* runs one function on every block of a :class:`~c3dseg.blockwise.grid.BlockGrid` as Dask
tasks.  Each task reads what it needs from zarr stores on a shared file system, writes its block of
the outputs, and finally writes a small *completion record* (its return value, pickled) into the
run's work folder, atomically.  A rerun of the same command finds the records and only submits the
blocks that have none: an interrupted run resumes where it stopped, and a task whose worker died
is simply run again by the scheduler (its outputs are rewritten whole, so a half-written block
is harmless).

Clusters
--------
* default: a :class:`distributed.LocalCluster` of ``workers`` processes with one thread each and a
  per-worker ``memory_limit``;
* ``scheduler="tcp://HOST:PORT"``: an existing scheduler (started by ``dask scheduler`` or by
  dask-jobqueue, e.g. ``SLURMCluster``); the workers must see the same file system paths;
* ``client=``: a :class:`distributed.Client` made by the caller (Python API).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import C3DError, ExecutionError, PipelineError
from .grid import Block, BlockGrid

log = logging.getLogger("c3dseg")

@dataclass
class ClusterOptions:
    """How to get workers.  ``memory_limit``: bytes or a string such as ``"2GiB"`` (per worker)."""

    workers: int = 0                 # 0: one per core
    threads_per_worker: int = 1
    memory_limit: str | int | None = None
    scheduler: str | None = None
    processes: bool = True
    connect_timeout: float = 10.0


def parse_memory(value) -> int | None:
    """Bytes from ``"2GiB"``, ``"500MB"``, ``"1.5G"``, a number of bytes, or None/"auto"/0."""
    if value in (None, "", 0, "0", "auto", "none"):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(str(value).strip())
    except (ValueError, TypeError):
        raise PipelineError(f"--memory-limit: cannot parse {value!r} (examples: 2GiB, 500MB)") from None
    if n <= 0:
        raise PipelineError(f"--memory-limit must be > 0, got {value!r}")
    return int(n)


def open_client(opts: ClusterOptions):
    """A connected ``distributed.Client`` and the cluster we started (None for a given scheduler).

    Raises
    ------
    ExecutionError
        The scheduler cannot be reached (nothing has been written at that point).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - the 'dask' extra
        raise PipelineError("blockwise runs need dask and distributed: pip install 'c3dseg[dask]'") from None
    import dask

    if opts.scheduler:
        addr = opts.scheduler
        try:
            with dask.config.set({"distributed.comm.timeouts.connect": f"{opts.connect_timeout}s"}):
                client = Client(addr, timeout=opts.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExecutionError(f"cannot reach the Dask scheduler at {addr}: {msg}") from None
        except Exception as e:  # e.g. a malformed address
            raise ExecutionError(f"cannot reach the Dask scheduler at {addr}: {type(e).__name__}: {e}") from None
        return client, None
    n = opts.workers or (os.cpu_count() or 1)
    mem = parse_memory(opts.memory_limit)
    kw: dict[str, Any] = dict(n_workers=n, threads_per_worker=max(1, opts.threads_per_worker),
                              processes=opts.processes, dashboard_address=":0",
                              silence_logs=logging.ERROR)
    kw["memory_limit"] = mem if mem else ("auto" if opts.processes else 0)
    # single-threaded numerics inside each worker: the workers are the parallelism
    # (and few malloc arenas: zarr's decoding threads otherwise leave memory in per-thread arenas,
    # which inflates a worker's resident size well past what its arrays hold)
    env = {"OMP_NUM_THREADS": str(max(1, opts.threads_per_worker)),
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "65536"}
    try:
        # tasks keep nothing in worker memory (blocks go to zarr, results to records): no spilling
        # or pausing, which would only stall a worker near its limit; past 95 % it is restarted
        # and its blocks rerun
        cfg = {"distributed.nanny.pre-spawn-environ": env, "distributed.worker.daemon": False,
               "distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
               "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": 0.95}
        with dask.config.set(cfg):
            cluster = LocalCluster(**kw)
            client = Client(cluster, set_as_default=False)
    except Exception as e:
        raise ExecutionError(f"cannot start a local Dask cluster: {type(e).__name__}: {e}") from None
    return client, cluster


def close_client(client, cluster) -> None:
    for obj in (client, cluster):
        if obj is None:
            continue
        try:
            obj.close()
        except Exception:  # pragma: no cover - best effort at shutdown
            pass


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------

def _atomic_pickle(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_path(work_dir: str, pass_name: str, block: Block) -> str:
    return os.path.join(work_dir, "records", pass_name, block.name + ".pkl")


def _run_task(fn: Callable, block: Block, work_dir: str, pass_name: str, args: tuple, kwargs: dict):
    """Worker side: run ``fn`` on a block, then write its completion record."""
    result = fn(block, *args, **kwargs)
    _atomic_pickle(record_path(work_dir, pass_name, block), result)
    return result


class Runtime:
    """Runs passes over the blocks of ``grid`` on a Dask ``client``; records live in ``work_dir``.

    Parameters
    ----------
    progress : bool or "plain"
        tqdm bars (True), one line per 10 % on stderr ("plain"), or nothing (False).
    retries : int
        How often a failing task is retried before the run fails (a dead worker does not count:
        the scheduler reschedules its tasks by itself).
    """

    def __init__(self, client, grid: BlockGrid, work_dir: str, *, progress: bool | str = False,
                 retries: int = 2):
        self.client = client
        self.grid = grid
        self.work_dir = work_dir
        self.progress = progress
        self.retries = retries
        self.stats: dict[str, dict] = {}
        os.makedirs(work_dir, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        p = os.path.join(self.work_dir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def done(self, pass_name: str, block: Block) -> bool:
        return os.path.exists(record_path(self.work_dir, pass_name, block))

    def load(self, pass_name: str, block: Block):
        with open(record_path(self.work_dir, pass_name, block), "rb") as f:
            return pickle.load(f)

    # -- passes -------------------------------------------------------------------------------
    def run_pass(self, name: str, fn: Callable, *args, blocks: Iterable[Block] | None = None,
                 collect: bool = True, desc: str | None = None, **kwargs) -> dict:
        """Run ``fn(block, *args, **kwargs)`` on every block (those with a record are skipped).

        Returns ``{block.index: result}`` (loaded from the records) when ``collect``.
        """
        blocks = list(self.grid if blocks is None else blocks)
        todo = [b for b in blocks if not self.done(name, b)]
        total, skipped = len(blocks), len(blocks) - len(todo)
        t0 = time.perf_counter()
        label = desc or name
        if skipped:
            log.info("%s: %d of %d blocks already done (resuming)", label, skipped, total)
        if todo:
            self._submit(name, fn, todo, args, kwargs, total, skipped, label)
        self.stats[name] = {"blocks": total, "ran": len(todo), "seconds": time.perf_counter() - t0}
        if not collect:
            return {}
        return {b.index: self.load(name, b) for b in blocks}

    def _submit(self, name, fn, todo, args, kwargs, total, skipped, label):
        from distributed import as_completed

        client = self.client
        # big arguments travel once (scattered to the workers), not once per task
        args, kwargs, scattered = self._scatter_big(args, kwargs)
        key_base = f"c3d-{name}-{uuid.uuid4().hex[:6]}"
        futures = [client.submit(_run_task, fn, b, self.work_dir, name, args, kwargs, key=f"{key_base}-{b.name}",
                                 retries=self.retries, pure=False) for b in todo]
        bar = None
        if self.progress is True:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=skipped, unit="block", desc=label, file=sys.stderr, leave=False)
        done = skipped
        next_report = 0.1
        try:
            for fut in as_completed(futures, loop=client.loop):
                try:
                    fut.result()
                except C3DError as e:
                    raise e
                except Exception as e:
                    blk = fut.key.rsplit("-", 1)[-1]
                    raise ExecutionError(f"block {blk} failed in {label}: {type(e).__name__}: {e}") from e
                done += 1
                if bar is not None:
                    bar.update(1)
                elif self.progress == "plain" and done / total >= next_report - 1e-9:
                    print(f"progress: {label}: {done}/{total} blocks", file=sys.stderr, flush=True)
                    while next_report <= done / total:
                        next_report += 0.1
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()

    def _scatter_big(self, args, kwargs, limit: int = 1 << 16):
        """Arguments whose pickle exceeds ``limit`` bytes are scattered once (futures in their place)."""
        import cloudpickle

        def conv(v):
            try:
                big = len(cloudpickle.dumps(v)) > limit
            except Exception:
                return v
            if not big:
                return v
            return self.client.scatter(v, broadcast=False, hash=False)

        new_args = tuple(conv(a) for a in args)
        new_kw = {k: conv(v) for k, v in kwargs.items()}
        scattered = [v for v in list(new_args) + list(new_kw.values()) if type(v).__name__ == "Future"]
        return new_args, new_kw, scattered

    def gather_small(self, fn: Callable, *args, **kwargs):
        """Run a one-off function on a worker (e.g. a probe) and return its result."""
        fut = self.client.submit(fn, *args, pure=False, retries=self.retries, **kwargs)
        try:
            return fut.result()
        except C3DError:
            raise
        except Exception as e:
            raise ExecutionError(f"{getattr(fn, '__name__', 'task')} failed: {type(e).__name__}: {e}") from e


def worker_peak_memory(client) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process so far (``getrusage`` maxrss)."""
    return client.run(_peak_rss)


def _peak_rss() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
