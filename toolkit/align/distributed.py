"""Process groups: which rank this is, averaging over ranks, joining the launcher's group (torchrun,
deepspeed, srun) or making a one-process one."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.locks import LockHeld, WriterLock


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (identity on one process)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (identity on one process)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def held(self, lock: WriterLock) -> Iterator[None]:
        """`lock` held by rank 0 for all the ranks of one job. A refusal is raised on every rank with rank 0's
        message, so none of them waits in a collective for a rank that has left."""
        refusal = None
        if self.main:
            try:
                lock.acquire()
            except LockHeld as exc:
                refusal = str(exc)
        refusal = self.share(refusal)
        if refusal is not None:
            raise LockHeld(refusal)
        try:
            yield
        finally:
            if self.main:
                lock.release()


def resolve_engine(name: str) -> str:
    if name == "auto":
        return "deepspeed" if torch.cuda.is_available() else "torch"
    return name


def _slurm_env() -> None:
    """Under `srun` with one task per GPU, derive torch.distributed's variables from Slurm's."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        out = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
                             capture_output=True, text=True)
        env["MASTER_ADDR"] = (out.stdout.split() or ["127.0.0.1"])[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(engine: str, device: str = "auto") -> Dist:
    """Join the launcher's process group (torchrun, deepspeed, srun) or make a one-process one.

    DeepSpeed always needs a process group; on CPU it gets gloo and its shared-memory allreduce op,
    which it would JIT-compile for minutes on first use, is switched off (gloo does that job here).
    Call before loading the model: on CUDA it selects this rank's GPU.
    """
    _slurm_env()
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    dist = Dist(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(dist.local_rank)
    if engine == "deepspeed":
        if not cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import deepspeed.ops

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not cuda:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # cached dict build_shm_op consults
        if world == 1 and not torch.distributed.is_initialized():
            env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return dist
