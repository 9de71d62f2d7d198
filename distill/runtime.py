"""The one place that knows about processes, devices and collectives.

Algorithm code receives a :class:`Runtime` and calls ``all_reduce_sum``; it never imports
``torch.distributed`` or reads launcher environment variables. Under ``accelerate launch`` (or
``torchrun``) the Accelerator sets up the process group; in a plain ``python`` process the runtime
is a single rank and every collective is the identity.

    rt = Runtime.create(cpu=False)   # picks CUDA when present, one process per GPU
    rt.all_reduce_sum(t)             # sum across ranks (in place when distributed; returns t)
"""

from __future__ import annotations

import logging
import os
import zlib

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DivergedRanksError(RuntimeError):
    """Ranks hold different synthetic sets: a bug or a non-deterministic kernel, never ignored."""


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
            cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "true"
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not launched:
            device = torch.device("cpu" if cpu else "cuda")
            return cls(device=device)
        from accelerate import Accelerator

        acc = Accelerator(cpu=cpu)
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

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> str:
        return f"rank {self.rank} of world size {self.world_size} on {self.device}"
