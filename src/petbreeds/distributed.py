"""Several processes, one training run: torch.distributed (DDP), launched by torchrun's own engine.

    world = join(params.distributed)        # inside a rank: init the process group; World() for one process
    net = world.wrap(model, device)          # DistributedDataParallel across ranks; the model itself alone
    loss = world.mean(loss)                  # the global batch's loss, the same number on every rank
    logits = world.gather(local_logits)      # every rank's rows, in rank order

A stage that trains calls :func:`launch` when params ask for more than one process and it is not yet running
under torchrun: that starts ``distributed.nproc_per_node`` copies of the stage script through
``torch.distributed.launcher`` (the library behind the ``torchrun`` command), which meet at a c10d rendezvous,
and returns when all have ended. Each copy finds torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``) and joins. Rank 0 alone writes outputs, prints and logs; every rank computes the same losses
and metrics, because they are reduced or gathered over the global batch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from petbreeds.config import DistributedParams
from petbreeds.errors import PetbreedsError

# torchrun's environment in every worker it starts.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # World's fields, in order


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run; ``World()`` is a single process (no torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, prints the epoch table and logs to MLflow."""
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` under DistributedDataParallel (rank 0's weights broadcast, gradients averaged), or itself.

        Ranks other than 0 then reseed torch's RNG from their rank: each draws its own dropout masks, as one
        process does for each image of the global batch. Rank 0 keeps the stream a single process would have.
        """
        if self.world_size == 1:
            return model
        torch.manual_seed(torch.initial_seed() + self.rank)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (each rank's mean loss over an equal share of the global batch)."""
        if self.world_size == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world_size

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (rows may differ in number), concatenated in rank order, on the CPU."""
        if self.world_size == 1:
            return values
        parts: list[torch.Tensor | None] = [None] * self.world_size
        dist.all_gather_object(parts, values.cpu())
        return torch.cat([p for p in parts if p is not None])

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics on every rank: what is validated and saved is one model, rank 0's."""
        if self.world_size == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (the first ``n % world_size`` ranks take one more)."""
        per_rank, extra = divmod(n, self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return range(start, start + per_rank + (self.rank < extra))


SINGLE_PROCESS = World()


def world_size_of(params: DistributedParams) -> int:
    return params.nproc_per_node * params.nnodes


def under_torchrun() -> bool:
    """True inside a worker that torchrun (or :func:`launch`) started."""
    return all(name in os.environ for name in _ENV)


def backend_for(params: DistributedParams) -> str:
    """``distributed.backend``; auto = nccl on CUDA GPUs, gloo on CPUs."""
    if params.backend != "auto":
        return params.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(params: DistributedParams) -> World:
    """Join the process group torchrun set up (a single process: ``World()``, nothing initialised)."""
    if not under_torchrun():
        return World()
    world = World(*(int(os.environ[name]) for name in _ENV))
    if world.world_size == 1:
        return world
    backend = backend_for(params)
    if backend == "nccl" and not torch.cuda.is_available():
        raise PetbreedsError("params.yaml: distributed.backend nccl needs CUDA GPUs; use auto or gloo on CPUs")
    if params.sync_bn and not torch.cuda.is_available():
        raise PetbreedsError(
            "params.yaml: distributed.sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel); "
            "set it to false on CPUs"
        )
    if torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise PetbreedsError(
                f"params.yaml: distributed.nproc_per_node asks for {world.local_world_size} processes on this machine "
                f"but it has {torch.cuda.device_count()} GPU(s); set it to at most that (one process per GPU)"
            )
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=params.timeout_s))
    return world


def collective_failure(error: BaseException, params: DistributedParams) -> str | None:
    """The words for an error of torch.distributed itself (a peer that hung past the timeout, or vanished),
    or None when ``error`` is something else."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error).lower()):
        return (
            f"a collective with the other ranks failed ({text}): another rank hung past distributed.timeout_s="
            f"{params.timeout_s:g} s or died; see its message, or raise distributed.timeout_s if a step takes longer"
        )
    return None


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def record_error(message: str) -> bool:
    """Hand a rank's error message to its launcher (torchrun's error file), which reports it with the rank.

    False when there is no launcher to read it (then the caller prints it).
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return False
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(PetbreedsError(message))
    return True


def _failure_text(rank: int, failure: object) -> str:
    exitcode = getattr(failure, "exitcode", None)
    message = str(getattr(failure, "message", "") or "")
    if isinstance(exitcode, int) and exitcode < 0:
        how = f"killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exit code {exitcode}"
    # torchrun's message for a recorded exception is a dict-like text; keep the words of ours
    text = message.split("PetbreedsError: ", 1)[-1].strip() if message else ""
    if not text or text.startswith("To enable traceback") or text.startswith("Signal "):
        return f"rank {rank} failed ({how})"
    return f"rank {rank} failed ({how}): {text.splitlines()[0]}"


def launch(script: Path, params: DistributedParams, stage: str, args: Sequence[str] = ()) -> None:
    """Run ``script args...`` as ``nproc_per_node`` ranks on this node (of ``nnodes``) under torchrun's launcher.

    Returns when every rank has finished; a failed or killed rank stops the others (torchrun's elastic agent
    does that) and raises a :class:`PetbreedsError` naming the first failed rank and its message. Rank 0 only
    writes its outputs after the last collective, so a run that fails leaves the previous outputs in place.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)  # agent chatter, not ours
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun's rule, with the machine's cores shared out instead of 1 thread each
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // params.nproc_per_node))
    single = params.nnodes == 1
    config = LaunchConfig(
        min_nodes=params.nnodes,
        max_nodes=params.nnodes,
        nproc_per_node=params.nproc_per_node,
        # one node: a private rendezvous on a free local port (torchrun --standalone); several: node 0's
        run_id=uuid.uuid4().hex if single else f"petbreeds-{stage}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if single else params.rdzv_endpoint,
        rdzv_configs={"join_timeout": params.timeout_s},
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)(str(script), *args)
    except ChildFailedError as e:
        first = min(e.failures.items(), key=lambda item: getattr(item[1], "timestamp", 0))
        others = sorted(rank for rank in e.failures if rank != first[0])
        also = f"; rank(s) {', '.join(map(str, others))} stopped too" if others else ""
        raise PetbreedsError(
            f"{_failure_text(*first)}{also}. The outputs of the previous run are untouched; fix the cause and "
            "re-run (`dvc repro`)"
        ) from None
    except Exception as e:  # the rendezvous: a node that never came, a port taken, an unreachable endpoint
        raise PetbreedsError(f"torchrun could not start the {world_size_of(params)} processes: {e}") from None
