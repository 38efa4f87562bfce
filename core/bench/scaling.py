"""`python -m core bench --ddp N`: data-parallel scaling of training on this machine.

Times the product's own training step (`ProductTrainer`, so DDP exactly as `torchrun ... -m core
train` runs it) in one process, then in N processes joined by a process group (gloo on CPU, NCCL on
GPUs), each at the same per-process batch. Scaling efficiency = images/s of the N processes ÷
(N × images/s of one process): 1.0 is perfect data parallelism.

On GPUs, process r uses GPU r and the single process GPU 0. On a CPU the cores are shared, so the one
process gets all of them as threads and each of the N gets cores / N: the figure then says what
splitting the same cores into processes costs or gains (the speed-up), not more hardware. The
processes are started with torch.multiprocessing (as torchrun would start them, but in one command);
each draws seeded random pixels, since a step's speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import PRESETS, ConfigError, RunConfig
from ..device import resolve_device, synchronize
from ..train.distributed import World, all_reduce_sum, device_for, init_process_group, shutdown
from .runner import FULL, QUICK, SMOKE, MODEL_PRESETS, ProductTrainer, _r, device_name, print_result

TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config_json: str, threads: int, warmup: int, steps: int,
            results) -> None:
    """One process: join the group (N > 1), time `steps` training steps after `warmup`, and report
    the images/s of all processes together (an all-reduce of each one's rate) from rank 0."""
    torch.set_num_threads(threads)
    config = RunConfig.from_json(config_json)
    world = World(rank=rank, size=world_size, local_rank=rank)
    if world.distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        init_process_group(world, "auto", TIMEOUT_S)
    try:
        device = device_for(world, resolve_device(config.train.device))
        batch = config.train.batch_size
        gen = torch.Generator().manual_seed(rank)
        images = torch.randint(0, 256, (max(4 * batch, 1024), *config.data.shape), generator=gen,
                               dtype=torch.uint8)
        trainer = ProductTrainer(config, device, images, batch)
        for _ in range(warmup):
            trainer.step()
        synchronize(device)
        if world.distributed:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        synchronize(device)
        rate = torch.tensor([steps * batch / (time.perf_counter() - start)], dtype=torch.float64, device=device)
        total = float(all_reduce_sum(rate, world)[0])
        if world.is_main:
            results.put(total)
    finally:
        shutdown()


def _images_per_s(config: RunConfig, processes: int, threads: int, warmup: int, steps: int) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_worker, args=(processes, _free_port(), config.to_json(), threads, warmup, steps, results),
                       nprocs=processes, join=True, start_method="spawn")
    return results.get()


def measure_scaling(processes: int, plan, device: str = "auto", model: str = "unet") -> dict:
    """Images/s of 1 and of `processes` data-parallel processes, and the efficiency of the split."""
    began = time.perf_counter()
    dev = resolve_device(device)
    base = PRESETS[MODEL_PRESETS[model]]
    config = replace(base, train=replace(base.train, device=dev.type, batch_size=plan.batch_size))
    cores = os.cpu_count() or 1
    if dev.type == "cuda" and torch.cuda.device_count() < processes:
        raise ConfigError(f"ddp = {processes} is not allowed: it needs {processes} GPUs and "
                          f"{torch.cuda.device_count()} are visible")
    one_threads = cores if dev.type == "cpu" else 1
    each_threads = max(1, cores // processes) if dev.type == "cpu" else 1
    steps, warmup = plan.train_steps, max(1, plan.train_warmup)
    one = _images_per_s(config, 1, one_threads, warmup, steps)
    many = _images_per_s(config, processes, each_threads, warmup, steps)
    return {
        "mode": f"ddp-{plan.mode}",
        "device": {"type": dev.type, "name": device_name(dev), "torch": torch.__version__,
                   "python": platform.python_version(), "cpu_count": cores,
                   "gpus": torch.cuda.device_count() if dev.type == "cuda" else 0},
        "ddp": {"processes": processes, "backend": "nccl" if dev.type == "cuda" else "gloo",
                "model": model, "batch_size_per_process": plan.batch_size,
                "global_batch_size": plan.batch_size * processes, "timed_steps": steps,
                "one_process": {"threads": one_threads, "images_per_s": _r(one, 2)},
                "n_processes": {"threads_each": each_threads, "images_per_s": _r(many, 2)},
                "speedup": _r(many / one, 3), "scaling_efficiency": _r(many / (processes * one), 3),
                "what": "scaling_efficiency = images/s of N processes / (N x images/s of one process); on a CPU "
                        "the N processes share the one process's cores, so compare the speedup there"},
        "elapsed_s": _r(time.perf_counter() - began, 1),
    }


def run(args: argparse.Namespace) -> int:
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.batch_size is not None:
        plan = replace(plan, batch_size=args.batch_size)
    result = measure_scaling(args.ddp, plan, args.device, args.ddp_model)
    return print_result(result, args.out)
