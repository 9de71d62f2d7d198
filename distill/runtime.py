"""The one place that knows about processes, devices and collectives.

Algorithm code receives a :class:`Runtime` and calls ``all_reduce_sum``; it never imports
``torch.distributed`` or reads launcher environment variables. Under ``accelerate launch`` (or
``torchrun``, or ``mpirun``) the Accelerator sets up the process group; in a plain ``python``
process the runtime is a single rank and every collective is the identity.

On CPU the process group uses gloo. Note that ``accelerate launch --cpu --num_processes 2`` starts
ONE process (Accelerate's simple launcher); two CPU ranks come from
``launch/accelerate/cpu_2proc.yaml`` (``distributed_type: MULTI_GPU`` + ``use_cpu: true``), from
``--multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true``, or from
``torchrun --standalone --nproc_per_node 2``. See docs/distributed.md.

    rt = Runtime.create(cpu=False)   # picks CUDA when present, one process per GPU
    rt.all_reduce_sum(t)             # sum across ranks (in place when distributed; returns t)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import zlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from distill.checks import check_team

log = logging.getLogger(__name__)

# launchers' world-size variables: torchrun/accelerate, then MPI flavours (Accelerate's MULTI_CPU)
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_flag(name: str) -> bool:
    """Accelerate writes ``str(bool)`` ("True"), users write "true", "1" or "yes"."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def launched_world_size() -> int:
    """Number of processes the launcher started (1 when run as plain ``python``)."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when run as plain ``python``)."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def device_for(gpus: float | None = None) -> str:
    """Where a job that asks for ``gpus`` GPUs (None: any there are) runs, decided in the
    process that runs it (a Ray worker may have a GPU its driver lacks): "cuda" when it asks for
    one and CUDA is here, else "cpu"."""
    return "cuda" if (gpus is None or gpus > 0) and torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def cpu_threads(n: float) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads, restoring the count afterwards.

    CPU reductions split work by thread, so the last bits of a result depend on the count; every
    stage that promises bit-identical results (experts, distillation) runs under a count taken
    from its config rather than from the launcher (accelerate sets 1 thread, python all cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Threads a live gloo (or NCCL) process group runs. ``destroy_process_group`` only drops the
# references torch.distributed holds; the group (and these threads) ends when the last one goes.
# Importing ``torch._dynamo`` while a group exists makes dynamo hold ~10 more references to it
# (measured with sys.getrefcount on torch 2.14.1; FlopCounterMode, used by the estimate, and
# torch.compile both import it), so the group outlived ``destroy_process_group`` and was
# destructed during interpreter shutdown, where a 2-rank CPU run aborted now and then ("terminate
# called without an active exception", exit -6; bench/results/teardown_stress.md). ``Runtime.create`` therefore
# imports dynamo before the group is created, and ``Runtime.close`` warns if threads remain.
# The gloo names are checked by tests/test_teardown.py; the NCCL one is unchecked (no GPU here).
_COMM_THREADS = ("gloo", "pt_gloo", "pt_nccl")


def comm_threads() -> list[str]:
    """Names of this process's threads that belong to a process group (Linux; [] elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_COMM_THREADS):
            names.append(name)
    return sorted(names)


class DivergedRanksError(RuntimeError):
    """Ranks hold different synthetic sets: a bug or a non-deterministic kernel, never ignored."""


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group, differentiable to any order: the backward of a sum that every
    rank receives is the sum of every rank's gradient, i.e. the same collective again."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, team: Team) -> torch.Tensor:
        ctx.team = team
        team.collectives += 1
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=team.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.team), None


class Team:
    """The ranks that share every BN group (``distill.group_ranks``): ``size`` consecutive ranks.

    ``all_reduce_sum`` is differentiable (twice and more), so batch-norm statistics summed over
    the team stay inside autograd: the replay's double backward reaches every member's rows.
    """

    def __init__(self, *, size: int = 1, index: int = 0, member: int = 0, count: int = 1,
                 group=None):
        self.size, self.index, self.member, self.count, self.group = size, index, member, count, group
        self.collectives = 0  # all-reduces made, forward and backward (docs/distributed.md)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        return _AllReduceSum.apply(tensor, self)


SOLO = Team()


class Runtime:
    def __init__(self, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 accelerator=None):
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.accelerator = accelerator

    @classmethod
    def create(cls, *, cpu: bool | None = None) -> Runtime:
        """One rank per process; uses Accelerate when launched by ``accelerate launch``/torchrun."""
        if cpu is None:
            cpu = not torch.cuda.is_available() or _env_flag("ACCELERATE_USE_CPU")
        if launched_world_size() == 1:
            device = torch.device("cpu" if cpu else "cuda")
            return cls(device=device)
        from accelerate import Accelerator

        importlib.import_module("torch._dynamo")  # before the group exists: _COMM_THREADS
        acc = Accelerator(cpu=cpu)
        if acc.num_processes != launched_world_size():
            raise RuntimeError(f"the launcher started {launched_world_size()} processes but "
                               f"Accelerate set up {acc.num_processes} ({acc.distributed_type})")
        return cls(rank=acc.process_index, world_size=acc.num_processes, device=acc.device,
                   accelerator=acc)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def team(self, size: int) -> Team:
        """This rank's team of ``size`` consecutive ranks that share each BN group.

        Every rank must call this with the same size (process groups are created collectively);
        the team is created once and reused.
        """
        if size == 1:
            return SOLO
        check_team(size, ranks=self.world_size)
        teams = getattr(self, "_teams", {})
        if size not in teams:
            mine = None
            for index in range(self.world_size // size):  # every rank creates every group
                group = dist.new_group(list(range(index * size, (index + 1) * size)))
                if self.rank // size == index:
                    mine = group
            teams[size] = Team(size=size, index=self.rank // size, member=self.rank % size,
                               count=self.world_size // size, group=mine)
            self._teams = teams
        return teams[size]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        """``obj`` from rank 0 on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_identical(self, *tensors: torch.Tensor, what: str = "state") -> None:
        """Fail loudly when ranks disagree: compare a CRC of the bytes across ranks."""
        if not self.distributed:
            return
        crc = 0
        for t in tensors:
            crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
        mine = torch.tensor([crc], dtype=torch.int64, device=self.device)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if int(lo) != int(hi):
            raise DivergedRanksError(
                f"rank {self.rank}: {what} differs between ranks (checksum {crc}, range "
                f"{int(lo)}..{int(hi)}); the distilled sets would drift apart")

    def close(self, *, ok: bool = True) -> None:
        """Tear the process group down, once, in an order that cannot race.

        ``ok`` (every rank got to the end): a barrier first, so no rank closes its connections
        while another still has a collective in flight, then each rank destroys its group.
        Not ``ok`` (this rank raised): no barrier, since the other ranks may be anywhere; the
        group is destroyed at once, which makes their pending collectives fail fast instead of
        waiting for the gloo timeout. Either way the group is destroyed, and freed, before the
        interpreter exits: a group left to interpreter shutdown can abort the process ("terminate
        called without an active exception") when its worker threads outlive Python
        (``_COMM_THREADS`` says what kept it alive and how that is prevented)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        try:
            if ok and self.distributed:
                dist.barrier()
        finally:
            for team in getattr(self, "_teams", {}).values():
                team.group = None  # a reference kept anywhere would keep the group alive
            self._teams = {}
            if self.accelerator is not None:
                self.accelerator.end_training()  # trackers; destroys the group
            if dist.is_initialized():
                dist.destroy_process_group()
            left = comm_threads()
            if left:
                log.warning("rank %d: the process group is still referenced after "
                            "destroy_process_group (threads %s remain); its destructor runs at "
                            "interpreter exit, which can abort the process", self.rank,
                            ", ".join(left))

    def describe(self) -> str:
        return f"rank {self.rank} of world size {self.world_size} on {self.device}"
