"""Several processes, one training run: torch.distributed (DDP), launched by torchrun's own engine.

    world = join(params.distributed)        # inside a rank: init the process group; World() for one process
    net = wrap(world, model, device)         # DistributedDataParallel across ranks; the model itself alone
    loss = mean(world, loss)                 # the global batch's loss, the same number on every rank
    logits = gather(world, local_logits)     # every rank's rows, in rank order

``World`` (who this process is among the ranks) lives in ``petbreeds.world``, which imports no torch: every stage
script reads it through ``petbreeds.stage``.

A stage that trains calls :func:`launch` when params ask for more than one process and it is not yet running
under torchrun: that starts ``distributed.nproc_per_node`` copies of the stage script through
``torch.distributed.launcher`` (the library behind the ``torchrun`` command), which meet at a c10d rendezvous,
and returns when all have ended. Each copy finds torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``) and joins. Rank 0 alone writes outputs, prints and logs; every rank computes the same losses
and metrics, because they are reduced or gathered over the global batch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from petbreeds.config import DistributedParams
from petbreeds.errors import PetbreedsError
from petbreeds.machine import usable_cores
from petbreeds.runtime import verbose
from petbreeds.world import SINGLE_PROCESS, World, under_torchrun, world_from_env, world_size_of

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

T = TypeVar("T")


def wrap(world: World, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel (rank 0's weights broadcast, gradients averaged), or itself alone.

    With ``sync_bn`` every BatchNorm layer (timm's BatchNormAct too) becomes a SyncBatchNorm first, in place: the
    same parameters and buffers, so optimizers, freezing and checkpoints see no difference. Ranks other than 0
    then reseed torch's RNG from their rank: each draws its own dropout masks, as one process does for each image
    of the global batch. Rank 0 keeps the stream a single process would have.
    """
    if world.world_size == 1:
        return model
    if world.sync_bn:
        convert_sync_batchnorm(model)  # replaces the children of model; model itself is no BatchNorm
    torch.manual_seed(torch.initial_seed() + world.rank)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (each rank's mean loss over an equal share of the global batch)."""
    if world.world_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / world.world_size


def gather(world: World, values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` (rows may differ in number), concatenated in rank order, on the CPU."""
    if world.world_size == 1:
        return values
    parts: list[torch.Tensor | None] = [None] * world.world_size
    dist.all_gather_object(parts, values.cpu())
    return torch.cat([p for p in parts if p is not None])


def sync_buffers(world: World, model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank: what is validated and saved is one model, rank 0's."""
    if world.world_size == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def from_rank_0(world: World, decide: Callable[[], T]) -> T:
    """Rank 0's ``decide()``, on every rank (the others never call it): one decision for all, such as the precision
    a calibration chose, even where the ranks run on different CPUs. Without a process group, ``decide()`` here."""
    if world.world_size == 1 or not dist.is_initialized():
        return decide()
    box: list[T | None] = [decide() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def backend_for(params: DistributedParams) -> str:
    """``distributed.backend``; auto = nccl on CUDA GPUs, gloo on CPUs."""
    if params.backend != "auto":
        return params.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(params: DistributedParams) -> World:
    """Join the process group torchrun set up (a single process: ``World()``, nothing initialised)."""
    if not under_torchrun():
        return SINGLE_PROCESS
    world = world_from_env(sync_bn=params.sync_bn)
    if world.world_size == 1:
        return world
    _end_with_launcher()
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


# prctl(2)'s option: the signal the kernel sends this process when its parent ends
_PR_SET_PDEATHSIG = 1


def _end_with_launcher() -> None:
    """This rank is killed when its launcher (torchrun's agent) ends, on Linux.

    The agent starts each rank in a session of its own, so a launcher killed outright (SIGKILL, an OOM kill, a killed
    `dvc repro`) would leave the ranks training on, writing outputs and resume states for a run nobody waits for.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# How a rank words the loss of a peer: a consequence of another rank's failure, never its cause (see failure_message).
LOST_PEER = "lost the other ranks"
# gloo's RuntimeErrors: most name gloo (its source path), but a pair that timed out in a broadcast (DDP's buffer sync
# before a forward) only says "Application timeout caused pair closure".
_GLOO_WORDS = ("gloo", "pair closure")


def collective_failure(error: BaseException, params: DistributedParams) -> str | None:
    """The words for an error of torch.distributed itself (a peer that hung past the timeout, or vanished),
    or None when ``error`` is something else. gloo raises plain RuntimeErrors: only their words tell."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    gloo = isinstance(error, RuntimeError) and any(word in text.lower() for word in _GLOO_WORDS)
    if not (isinstance(error, dist.DistError) or gloo):
        return None
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (
            f"waited longer than distributed.timeout_s={params.timeout_s:g} s for the other ranks ({text}): a rank "
            "hung; raise distributed.timeout_s if a step can take that long"
        )
    return f"{LOST_PEER} ({text}): another rank stopped; its failure is the cause"


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def record_error(error: BaseException) -> bool:
    """Hand a rank's error to its launcher: torch's error file (``TORCHELASTIC_ERROR_FILE``, written by torch's
    handler as ``@record`` writes it), which the launcher reads into the failure it reports with the rank. False
    when there is no launcher to read it (then the caller prints it)."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return False
    get_error_handler().record_exception(error)
    return True


def _error_text(failure: ProcessFailure) -> str:
    """What the rank's error file says, without the exception's type for a :class:`PetbreedsError` (its message is
    written for people); empty without an error file (the rank was killed, or died before it could write one)."""
    if not isinstance(failure.message, dict):  # torch made up a message: a signal's, or a pointer to its docs
        return ""
    return str(failure.message.get("message", "")).removeprefix(f"{PetbreedsError.__name__}: ")


def _stopped_by_another(failure: ProcessFailure) -> bool:
    """A rank stopped because another failed: the agent's SIGTERM to the survivors, or a peer lost in a collective."""
    return failure.exitcode == -signal.SIGTERM or _error_text(failure).startswith(LOST_PEER)


def failure_message(failures: Mapping[int, ProcessFailure]) -> str:
    """The one line a failed launch ends with: the rank that caused it and its message, the ranks stopped with it.

    The cause is torch's root cause (``ChildFailedError.get_first_failure``: the earliest failure) among the ranks
    that failed by themselves: a rank that only lost its peers, or that the agent stopped, often wrote its error
    before the agent noticed the rank that caused it.
    """
    causes = [rank for rank, failure in failures.items() if not _stopped_by_another(failure)] or list(failures)
    rank = min(causes, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    text = _error_text(failure).strip()
    others = sorted(r for r in failures if r != rank)
    also = f"; rank(s) {', '.join(map(str, others))} stopped too" if others else ""
    return (
        f"rank {rank} failed ({how}){f': {text.splitlines()[0]}' if text else ''}{also}. No rank wrote an output "
        "(rank 0 writes only after the last collective); fix the cause and re-run (`dvc repro`)"
    )


def launch(script: Path, params: DistributedParams, stage: str, args: Sequence[str] = ()) -> None:
    """Run ``script args...`` as ``nproc_per_node`` ranks on this node (of ``nnodes``) under torchrun's launcher.

    Returns when every rank has finished; a failed or killed rank stops the others (torchrun's elastic agent
    does that) and raises a :class:`PetbreedsError` naming the first failed rank and its message. Rank 0 only
    writes its outputs after the last collective, so a run that fails leaves the previous outputs in place.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not verbose():  # the agent's own lines repeat what our one error line says
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun's rule, with the machine's cores shared out instead of 1 thread each
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // params.nproc_per_node))
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
        raise PetbreedsError(failure_message(e.failures)) from None
    except Exception as e:  # the rendezvous: a node that never came, a port taken, an unreachable endpoint
        raise PetbreedsError(f"torchrun could not start the {world_size_of(params)} processes: {e}") from None
