"""Processes that train together: the process group torchrun sets up, and the few collectives the
training engine needs. With one process every call here is a no-op, so the engine is one loop with or
without ranks (torchtitan's shape: a thin layer over torch.distributed).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address; `kiln train --nproc N` starts
torchrun for the user. NCCL joins CUDA processes, gloo CPU ones. torch is imported only by the calls
that need it: every `kiln` command asks `launched_world()` at start, most never train.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    import torch

# How long a rank waits in a collective for the others before it gives up with a message (a rank that
# died mid-step), instead of hanging forever.
TIMEOUT_ENV = "KILN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


class DistributedError(KilnError):
    """The processes of a run could not work together: a lost rank, or settings they cannot split."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The rank and world size torchrun gave this process (one process when not under torchrun)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        size=size,
        local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))),
    )


_collective_device = "cpu"  # NCCL reduces tensors on the GPU, gloo on the CPU


def join(world: World, device: torch.device) -> None:
    """Join the process group (once): NCCL for CUDA, gloo otherwise."""
    import torch
    import torch.distributed as dist

    global _collective_device
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    _collective_device = device if device.type == "cuda" else "cpu"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def collective(world: World, what: str) -> Iterator[None]:
    """Turn a peer lost in the middle of `what` into one line that names this rank."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed's DistBackendError among them
        if not world.distributed:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {world.rank} of {world.size}: lost the other processes during {what} ({first}); "
            "another rank probably failed, see its message above"
        ) from e


def all_reduce_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over every rank (the tensor itself with one process)."""
    return all_reduce_sum_later(world, values)()


def all_reduce_sum_later(world: World, values: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start summing `values` over every rank and go on; the returned function waits for the sum."""
    if not world.distributed:
        return lambda: values
    import torch.distributed as dist

    on_device = values.to(_collective_device)
    with collective(world, "a step"):
        work = dist.all_reduce(on_device, op=dist.ReduceOp.SUM, async_op=True)

    def result() -> torch.Tensor:
        with collective(world, "a step"):
            work.wait()
        return on_device.to(values.device)

    return result


def broadcast_tensor(world: World, values: torch.Tensor) -> torch.Tensor:
    """Rank 0's `values`, on every rank."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    on_device = values.to(_collective_device)
    with collective(world, "a step"):
        dist.broadcast(on_device, src=0)
    return on_device.to(values.device)


def broadcast_object(world: World, value):
    """Rank 0's `value`, on every rank."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    with collective(world, "a broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World, what: str) -> None:
    if world.distributed:
        import torch.distributed as dist

        with collective(world, what):
            dist.barrier()


def quiet_other_ranks(world: World) -> None:
    """Only rank 0 prints what a run says; the others' standard output goes nowhere (errors still show)."""
    if world.distributed and not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m kiln ARGV` as `nproc` processes on this machine, as torchrun --standalone would;
    returns the exit code. A process that fails is reported in one line (its own error is above)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise DistributedError(f"--nproc {nproc}: give at least 1 process")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own notes, not ours
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as --standalone picks
        max_restarts=0,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "kiln", *argv)
    except SignalException as e:  # Ctrl-C or SIGTERM: the processes were asked to save and stop
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause; the rest were stopped because of it
        if failure.exitcode > 0:
            print(
                f"kiln: error: process {rank} of {nproc} exited with code {failure.exitcode} (its message is above)",
                file=sys.stderr,
            )
            return failure.exitcode
        print(
            f"kiln: error: process {rank} of {nproc} was killed (signal {-failure.exitcode}); the others were "
            "stopped, and the run's last/ checkpoint continues it with --resume",
            file=sys.stderr,
        )
        return 1
    return 0
