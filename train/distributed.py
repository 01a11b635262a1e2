"""torch.distributed for the training loop, launched by torchrun (or not at all).

    torchrun --standalone --nproc_per_node=2 -m train ...          (gloo on CPU, nccl on CUDA)
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 -m train ...

Without torchrun's environment everything here degrades to a single process: rank 0 of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun: join a process group, even of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restarted(self) -> bool:
        """torchrun --max-restarts restarted this group: pick up from the last checkpoint."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def from_environment() -> Group:
    if "WORLD_SIZE" not in os.environ:
        return Group()
    return Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), True)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start(group: Group, device: torch.device) -> None:
    """Join the process group: nccl for CUDA (one GPU per process, LOCAL_RANK), gloo on the CPU."""
    if not group.launched:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent can keep one store across --max-restarts: the keys of the dead
        # attempt then send the new group to old addresses (gloo: "Connection refused",
        # pytorch/pytorch#167288). Each attempt gets a namespace of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    group.world_size, is_master=False, timeout=timedelta(minutes=5))
        store = dist.PrefixStore(f"train/attempt-{attempt}", agent_store)
        dist.init_process_group(backend(device), store=store, rank=group.rank, world_size=group.world_size)
    else:
        dist.init_process_group(backend(device))


def stop(group: Group) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    if group.world_size > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model`; checkpoints keep saving the bare `model`, so no
    `module.` prefix ever reaches a file and single-process runs load them unchanged."""
    if not group.launched:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def my_share(batch: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    return batch.tensor_split(group.world_size)[group.rank] if group.world_size > 1 else batch


def from_main(group: Group, decide):
    """`decide()` run by rank 0 alone, its answer (or its SystemExit) handed to every rank.

    The checkpoint to resume from is decided so: ranks on other nodes may see another
    checkpoint folder, or none, and every rank must still resume from the same state.
    """
    if group.world_size == 1:
        return decide()
    payload = [None]
    if group.is_main:
        try:
            payload = [("ok", decide())]
        except SystemExit as stop:
            payload = [("exit", str(stop.code))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "exit":
        raise SystemExit(value if group.is_main else f"[rank {group.rank}] rank 0 stopped: {value}")
    return value


def sum_over_ranks(value: torch.Tensor, group: Group) -> torch.Tensor:
    if group.world_size > 1:
        dist.all_reduce(value)
    return value
