"""Data-parallel training under `torchrun`: who this process is, and the few collectives the loop needs.

torchrun (torch.distributed.run) starts the processes, does the rendezvous (one node or many) and
sets RANK, WORLD_SIZE and LOCAL_RANK; this module only reads them, opens the process group with a
bounded timeout (nccl on CUDA, gloo on the CPU), and wraps torch.distributed's own broadcast and
all_reduce. Nothing here launches processes or reduces by hand.

A process started without torchrun is rank 0 of a world of 1, and every helper is then a no-op,
so the training loop, the dashboard's jobs and the bench run the same code either way.
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..errors import CliError, RunError

T = TypeVar("T")

BACKEND_NAMES = ("auto", "nccl", "gloo")
# Long enough for rank 0 to write a checkpoint and a preview grid while the others wait at their
# next all-reduce; short enough that a hung peer on another machine ends the job in minutes.
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "DDPM_DIST_TIMEOUT_S"
# Words in the errors gloo and NCCL raise when a peer died or the network broke (they come as a
# plain RuntimeError, not always as torch.distributed.DistError).
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout",
                         "broken pipe", "socket")


class PeerFailure(RuntimeError):
    """Another rank died or hung, or the launcher stopped this one: the job cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank r of `size` processes, on local device `local_rank`."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} = {value!r} is not allowed: torchrun sets it to a whole number") from None


def launched_world() -> World:
    """The world torchrun described in the environment; rank 0 of 1 without torchrun."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK = {rank} and WORLD_SIZE = {size} are not allowed: need 0 <= RANK < WORLD_SIZE")
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", 0))


def current_world() -> World:
    """The world of the open process group, or rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0))


def check_backend(requested: str, device: str | torch.device) -> None:
    """A forced backend that cannot carry the training device's tensors is refused, before any
    process group exists when the device is named, and again once `auto` has become a device."""
    if requested not in BACKEND_NAMES:
        raise ConfigError(f"dist_backend = {requested!r} is not allowed: choose one of {', '.join(BACKEND_NAMES)}")
    kind = device.type if isinstance(device, torch.device) else device
    if requested == "nccl" and (kind in ("cpu", "mps") or not torch.cuda.is_available()):
        raise ConfigError(f"dist_backend = 'nccl' is not allowed with device {kind}: NCCL only moves CUDA tensors "
                          "and needs a visible GPU; use --dist-backend gloo (or auto) to train on the CPU")
    if requested == "nccl" and not dist.is_nccl_available():
        raise ConfigError("dist_backend = 'nccl' is not allowed: this PyTorch was built without NCCL")


def group_backend(requested: str) -> str:
    """What init_process_group gets. `auto`: NCCL for CUDA tensors and gloo for CPU ones in one
    group, so the device may still be decided after rank 0 has read the run's config."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def timeout_seconds(value: float | None = None) -> float:
    """The process-group timeout: the flag, else $DDPM_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    if value is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"{TIMEOUT_ENV} = {raw!r} is not allowed: give seconds, e.g. 300") from None
    if not value > 0:
        raise ConfigError(f"dist_timeout = {value!r} is not allowed: it must be more than 0 seconds")
    return float(value)


def device_for(world: World, device: torch.device) -> torch.device:
    """Each process on a node takes the GPU of its LOCAL_RANK; CPU processes share the CPU."""
    if device.type != "cuda" or not world.distributed:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ConfigError(f"LOCAL_RANK = {world.local_rank} is not allowed: only {count} GPU(s) are visible on "
                          "this node; start at most that many processes per node (--nproc-per-node)")
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, requested: str, timeout_s: float) -> None:
    """Join the job torchrun started (its rendezvous is in the environment). A SIGTERM (torchrun
    stopping the survivors after a rank died) becomes a PeerFailure, so every rank ends with one
    clear line instead of vanishing."""
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)  # NCCL and object broadcasts use the current device
    dist.init_process_group(backend=group_backend(requested), timeout=timedelta(seconds=timeout_s))
    signal.signal(signal.SIGTERM, _raise_peer_failure)


def agree(decide: Callable[[], T], world: World) -> T:
    """Rank 0 alone runs `decide` (it alone reads or writes the run folder); every rank gets its
    result, or raises the same error, so all ranks go on or all stop, and none waits forever."""
    if not world.distributed:
        return decide()
    result, error = None, None
    if world.is_main:
        try:
            result = decide()
        except (ConfigError, RunError, CliError) as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - sent on as a plain error: it may not pickle
            error = RuntimeError(f"{type(exc).__name__} on rank 0: {exc}")
    result, error = broadcast_object((result, error), world)
    if error is not None:
        raise error
    return result


def _raise_peer_failure(signum: int, frame: Any) -> None:
    raise PeerFailure(f"{current_world()}: stopped by the launcher (signal {signum}), usually because another "
                      "rank failed; see its error above")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` says another rank or the network failed, rather than this rank's own bug."""
    if isinstance(exc, PeerFailure) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError) or not current_world().distributed:
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


def peer_failure_message(exc: BaseException) -> str:
    """One line for the user: which rank, what happened, what to do."""
    if isinstance(exc, PeerFailure):
        return str(exc)
    # gloo prefixes its messages with a source location; the reason follows it
    first = " ".join(re.sub(r"\[[^\]]*\.cc:\d+\]", "", str(exc)).split())[:160]
    return (f"{current_world()}: another rank stopped or the network failed ({first}); the run is interrupted: "
            "resume it with --resume")


# -- collectives (no-ops in a world of one) ------------------------------------------------------------
def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (config, decisions, optimizer state: small, once per job)."""
    if not world.distributed:
        return obj
    holder = [obj if world.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers into every rank's copy (after rank 0 alone read a checkpoint)."""
    if not world.distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Σ over ranks of `values`, in place, returned for chaining."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_model(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """DistributedDataParallel around `model` in a world of more than one, else `model` itself.
    DDP broadcasts rank 0's weights at construction and all-reduces (averages) gradients in backward."""
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
