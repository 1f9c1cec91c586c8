"""torch.distributed plumbing: one process per device, nccl on GPUs, gloo on CPUs.

Under ``mondeq train --nproc`` (:mod:`training.launch`) or ``torchrun`` (``WORLD_SIZE`` > 1)
:func:`setup` joins the process group; otherwise every helper here is the single-process
identity, so the training loop has one code path.

A rank that dies closes its sockets, so the others' next collective fails at once; one that
hangs (stopped, swapping, deadlocked) in a training step is noticed when a collective has
waited ``timeout_s`` (``--dist-timeout``, default :data:`DEFAULT_TIMEOUT_S`); the end of an
epoch, where rank 0 alone writes files, waits at least the default (:func:`patient`).
Either way a surviving rank raises :class:`PeerLost` instead of the backend's traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# How long a collective waits for the slowest rank. Healthy ranks meet at every step, and the
# longest wait is the others' while rank 0 writes an epoch's checkpoints and curves (seconds);
# 5 minutes leaves room for a slow disk and still bounds the wait for a hung rank.
DEFAULT_TIMEOUT_S = 300.0


class PeerLost(Exception):
    """A collective failed: another rank of the run died, exited early or stopped answering
    within the collective timeout. Nothing of the current epoch is written."""

    def __init__(self, rank: int, world: int, cause: BaseException):
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        # gloo: "[…/pair.cc:561] Connection closed by peer [127.0.0.1]:44464. This is
        # typically caused by …": the first sentence, without the source location.
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0] or type(cause).__name__
        super().__init__(f"rank {rank} of {world} lost its peers ({detail})")
        self.rank, self.world, self.detail = rank, world, detail


def is_peer_failure(e: BaseException) -> bool:
    """True if ``e`` is a collective's failure (gloo, nccl or the rendezvous store), not a bug.

    gloo raises a plain RuntimeError ("[…/gloo/transport/tcp/pair.cc:…] Connection closed by
    peer", "Timed out waiting 3000ms for recv operation to complete"); nccl and the store raise
    ``torch.distributed.DistError`` subclasses.
    """
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        mark in text for mark in ("gloo", "NCCL", "Connection closed by peer")
    )


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum plain numbers over ranks (float64 on the device)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.all_sum([float(flag)])[0] > 0

    def gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate per-rank tensors of possibly different lengths along dim 0."""
        if not self.enabled:
            return t
        parts: list = [None] * self.world
        dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts)

    def interleave(self, t: Tensor) -> Tensor:
        """Rebuild a global batch from equal shards ``rank::world`` (DistributedSampler order)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts, dim=1).flatten(0, 1)

    def broadcast_float(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def broadcast_object(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local rank>`` when a GPU is present, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    return device


def setup(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the process group if launched by ``--nproc`` or torchrun; pick this rank's device.

    ``timeout_s``: seconds any collective of the training steps waits for the other ranks
    before it fails, which :func:`training.loop.train` turns into :class:`PeerLost`. It takes
    effect at :func:`watch`; until then (the rendezvous, loading the data, claiming the run
    folder) the wait is at least :data:`DEFAULT_TIMEOUT_S`, since ranks reach it seconds
    apart on a busy machine (importing torch, reading the data) without any being hung.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Dist(0, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=max(timeout_s, DEFAULT_TIMEOUT_S)),
        )
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def watch(d: Dist, timeout_s: float) -> None:
    """From now on a collective fails after ``timeout_s`` seconds without the other ranks
    (:func:`torch.distributed.set_timeout`): every rank has started and loaded its data,
    and the ranks meet at every step."""
    if d.enabled and dist.is_initialized():
        dist.set_timeout(timedelta(seconds=timeout_s))


@contextlib.contextmanager
def patient(d: Dist, timeout_s: float) -> Iterator[None]:
    """Inside, a collective waits at least :data:`DEFAULT_TIMEOUT_S`; after, ``timeout_s`` again.

    For the end of an epoch, where the ranks do not meet in lockstep: each evaluates its own
    shard of the test set (one shard's samples may run to ``max_iter`` while the other's stop
    early), then the others wait in a barrier while rank 0 writes the checkpoints, metrics
    and curves (seconds on a busy machine or a slow disk). A short ``--dist-timeout`` there
    would take a healthy run for a hung one. If the block raises, the run is ending and the
    timeout is left as it is.
    """
    if not (d.enabled and dist.is_initialized()) or timeout_s >= DEFAULT_TIMEOUT_S:
        yield
        return
    dist.set_timeout(timedelta(seconds=DEFAULT_TIMEOUT_S))
    yield
    dist.set_timeout(timedelta(seconds=timeout_s))


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
