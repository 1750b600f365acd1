"""Data-parallel processes on one node: launch them, join them, and the few collectives
training needs.

:func:`launch` starts one process per GPU (``spawn``), gives each the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a
free port) and a process group (NCCL on CUDA, gloo on CPU), runs the function and
returns what each rank returned. If any rank fails, the others are stopped (SIGTERM, then
SIGKILL) and a :class:`DistributedError` names the rank and its error: a dead rank never
leaves the others waiting. Under ``torchrun`` the same code finds its group through
:func:`current`, which joins the group torchrun describes in the environment.

Inside a rank, :func:`current` gives the :class:`DistContext`: rank, world size, device,
and helpers (sum over ranks, broadcast of rank 0's numbers, "rank 0 first", the DDP
wrapper). Without a group it describes a single process and every helper is a no-op, so
training code has one path.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from matcouple.errors import MatcoupleError

BACKENDS = ("nccl", "gloo")


class DistributedError(MatcoupleError):
    """A rank of a data-parallel run failed; the message names the rank and its error."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None
    control: Any = field(default=None, repr=False, compare=False)  # gloo group (CPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (a new tensor on the tensor's device)."""
        if not self.enabled:
            return tensor
        work = tensor.detach().to(self.device if self.backend == "nccl" else "cpu").clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def from_main(self, values: Sequence[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (CPU collective: no device synchronisation).

        Decisions taken from clocks or signals (stop now? which learning rate?) must be
        identical on every rank, else the replicas diverge or wait for each other forever.
        """
        if not self.enabled:
            return [float(v) for v in values]
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.broadcast(buf, src=0, group=self.control)
        return buf.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a cache), then the others."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when there are several ranks, else itself.

        Keep a reference to the bare model: checkpoints store its ``state_dict`` (the
        ``.module`` of the wrapper), so they load the same in 1- and N-process runs.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def seed(self, *parts: int) -> int:
        """A seed that differs per rank (and per ``parts``) yet is reproducible."""
        value = 0x9E3779B97F4A7C15
        for p in (*parts, self.rank):
            value = (value ^ (int(p) + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9
            value &= (1 << 63) - 1
        return value


_current: DistContext | None = None


def current() -> DistContext:
    """This process's context: set by :func:`launch`, joined from torchrun's environment,
    or a single process."""
    global _current
    if _current is not None:
        return _current
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        _current = _join_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                               int(os.environ["LOCAL_RANK"]), default_backend())
        atexit.register(_leave_group)
        return _current
    return DistContext()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for the rendezvous of rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _timeout() -> timedelta:
    from matcouple.settings import get_settings

    return timedelta(minutes=get_settings().ddp_timeout_minutes)


def _join_group(rank: int, world: int, local_rank: int, backend: str) -> DistContext:
    if backend not in BACKENDS:
        raise DistributedError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    device = torch.device("cpu")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank} needs GPU {local_rank} but this node has "
                f"{torch.cuda.device_count()}; ask for fewer GPUs or use --backend gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_timeout())
    control = dist.new_group(backend="gloo", timeout=_timeout()) if backend == "nccl" else None
    return DistContext(rank, world, local_rank, backend, device, control)


def _leave_group() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def _rank_entry(index: int, fn: Callable, args_list: list[tuple], backend: str | None,
                port: int, folder: str, threads: int | None) -> None:
    """Body of one spawned process: environment, group, the call, its result or error."""
    global _current
    from matcouple.settings import get_settings

    world = len(args_list)
    if backend is not None:  # independent processes must not look like torchrun ranks
        os.environ.update({"RANK": str(index), "WORLD_SIZE": str(world),
                           "LOCAL_RANK": str(index), "LOCAL_WORLD_SIZE": str(world),
                           "MASTER_PORT": str(port),
                           "MASTER_ADDR": get_settings().ddp_master_addr})
    if threads:
        torch.set_num_threads(threads)
    try:
        if backend is not None:
            _current = _join_group(index, world, index, backend)
        result = fn(*args_list[index])
        if result is not None:
            torch.save(result, Path(folder) / f"result-{index}.pt")
    except BaseException as exc:
        with open(Path(folder) / f"error-{index}.pkl", "wb") as fh:
            pickle.dump({"time": time.time(), "type": type(exc).__name__, "message": str(exc),
                         "user_error": isinstance(exc, MatcoupleError),
                         "traceback": traceback.format_exc()}, fh)
        raise
    finally:
        if backend is not None:
            _leave_group()


def launch(fn: Callable, args_list: list[tuple], *, backend: str | None = None,
           threads_per_process: int | None = None) -> list[Any]:
    """Run ``fn(*args_list[i])`` in process ``i``; return each process's return value.

    With ``backend`` ('nccl' or 'gloo') the processes are the ranks of one process group
    (process i on GPU i with NCCL); with ``None`` they are independent (e.g. ensemble
    members pinned to their own GPU by ``fn``). ``fn`` must be importable (spawn).
    """
    if backend is not None and backend not in BACKENDS:
        raise DistributedError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "nccl" and len(args_list) > torch.cuda.device_count():
        raise DistributedError(
            f"{len(args_list)} NCCL ranks need {len(args_list)} GPUs; this node has "
            f"{torch.cuda.device_count()} (use --backend gloo for CPU processes)")
    with tempfile.TemporaryDirectory(prefix="matcouple-ddp-") as folder:
        context = mp.start_processes(
            _rank_entry, args=(fn, args_list, backend, free_port(), folder, threads_per_process),
            nprocs=len(args_list), join=False, start_method="spawn")
        try:
            while not context.join(grace_period=5.0):
                pass
        except ProcessException as exc:
            raise DistributedError(
                _describe_failure(Path(folder), exc, context.processes)) from None
        except KeyboardInterrupt:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise
        results = []
        for i in range(len(args_list)):
            path = Path(folder) / f"result-{i}.pt"
            results.append(torch.load(path, weights_only=False) if path.exists() else None)
        return results


def _describe_failure(folder: Path, exc: ProcessException, processes: list) -> str:
    """The root cause: a rank that died without a Python error (exit code, signal), else
    the first error a rank raised (the others usually fail because it left)."""
    reports = {}
    for path in folder.glob("error-*.pkl"):
        with open(path, "rb") as fh:
            reports[int(path.stem.split("-")[1])] = pickle.load(fh)
    silent = [(i, p.exitcode) for i, p in enumerate(processes)
              if i not in reports and p.exitcode and p.exitcode > 0]
    if not silent and not reports:
        silent = [(exc.error_index, processes[exc.error_index].exitcode)]
    if silent:
        rank, code = silent[0]
        how = f"exit code {code}" if code and code > 0 else f"signal {-(code or 0)}"
        message = (f"rank {rank} died without a Python error ({how}; killed, out of memory "
                   "or a crash in native code?)")
        if reports:
            other, first = min(reports.items(), key=lambda r: r[1]["time"])
            message += f"; rank {other} then failed: {first['type']}"
        return message + "; the other ranks were stopped"
    rank, first = min(reports.items(), key=lambda r: r[1]["time"])
    message = f"rank {rank} failed: {first['type']}: {first['message']}"
    if not first["user_error"]:
        message += f"\n{first['traceback']}"
    return message + "\n(the other ranks were stopped)"


def scaled_lr(lr: float, world_size: int, rule: str) -> float:
    """Learning rate for a global batch ``world_size`` times the per-GPU batch.

    "sqrt": lr x sqrt(N), the rule that keeps Adam/AdamW's update noise unchanged
    (Malladi et al., NeurIPS 2022); "linear": lr x N (Goyal et al. 2017, for SGD);
    "none": lr as given. Warm-up stays in place in every case.
    """
    factors = {"sqrt": world_size ** 0.5, "linear": float(world_size), "none": 1.0}
    if rule not in factors:
        raise MatcoupleError(f"unknown learning-rate scaling {rule!r}; use one of "
                             f"{sorted(factors)}")
    return lr * factors[rule]
