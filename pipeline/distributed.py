"""Data-parallel processes: who this process is, and the few collectives training needs.

`python -m pipeline train --processes N` re-launches itself under torchrun, which starts N
processes and tells each its RANK, WORLD_SIZE and LOCAL_WORLD_SIZE through the environment. One
process (no WORLD_SIZE, or WORLD_SIZE=1) needs no process group at all, so single-process runs
never touch torch.distributed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from pipeline.device import resolve_device
from pipeline.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that keeps the weight averages and writes every file."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def launched_processes() -> Processes:
    """What torchrun (or any launcher using its variables) says about this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    return Processes(rank=int(os.environ["RANK"]), world_size=world_size,
                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def start(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group (if launched as several processes) and pick this process's device.

    CUDA processes each claim a GPU no other pipeline process holds (pipeline.device) and talk
    over NCCL; CPU processes over gloo.
    """
    procs = launched_processes()
    device = resolve_device(device_name)
    if not procs.parallel:
        return procs, device
    if device.type == "cuda" and procs.local_world_size > torch.cuda.device_count():
        raise PipelineError(f"{procs.local_world_size} training processes were started on this "
                            f"node but torch sees {torch.cuda.device_count()} GPU(s); set "
                            f"training.processes to at most that (or request more GPUs).")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return procs, device


def stop(procs: Processes) -> None:
    if procs.parallel and dist.is_initialized():
        dist.destroy_process_group()


def gather_in_rank_order(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """Every process's `tensor` (same shape on all), concatenated along dim 0 in rank order.

    Shards hold consecutive global samples, so the result is the global batch in global order.
    """
    if not procs.parallel:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(procs.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sum_over_processes(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The elementwise sum of `tensor` over all processes (a new tensor; the input is kept)."""
    total = tensor.clone()
    if procs.parallel:
        dist.all_reduce(total)
    return total


def barrier(procs: Processes) -> None:
    if procs.parallel:
        dist.barrier()


def check_replicas_agree(parameters: list[torch.Tensor], procs: Processes, step: int) -> None:
    """Raise if any process's weights differ from rank 0's.

    Compares one float64 sum per tensor: exact equality of those sums across processes holds
    whenever the weights are equal, and a drifted replica changes them in practice.
    """
    if not procs.parallel:
        return
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in parameters])
    gathered = gather_in_rank_order(fingerprint[None], procs)
    drifted = [r for r in range(1, procs.world_size) if not torch.equal(gathered[r], gathered[0])]
    if drifted:
        raise PipelineError(f"after step {step} the weights of process(es) {drifted} differ from "
                            f"process 0: the data-parallel replicas drifted apart. This is a bug in "
                            f"the training code or a faulty device; please report it.")
