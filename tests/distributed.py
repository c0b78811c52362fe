"""Helpers to run a function in several CPU processes on the gloo backend."""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():  # the code under test may have ended it (accelerate's end_training)
            dist.destroy_process_group()


def run_processes(fn, world: int = 2, args=()):
    """Run ``fn(rank, world, *args)`` in ``world`` processes; return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), fn, out_dir, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
