"""`python -m core bench`: training and sampling speed on this device, as one JSON object.

Everything is measured in one run, so the ratios hold even when absolute numbers drift
(a shared CPU, turbo, another process): the device's dense fp32 matmul rate, training images/s
of the book's UNet and the ImprovedUNet through the product's own `training_step`, their
achieved GFLOP/s as a fraction of that matmul rate, DDPM-1000 and DDIM-50 sampling time through
the product's `sample`, peak memory, and the book's original code (`core/bench/reference.py`) timed
against the product's book preset step for step, so the speed-up is a ratio. The full run also
switches each fast path (channels_last) on and off, alternating steps, and reports the ratios.

Timing notes: one warm-up step (or forward) precedes every timed block, since the first call
allocates and picks kernels. On CPU each training step is timed alone and the median is reported,
which resists a neighbour's burst of load; the matmul rate is the best of rounds taken between
the other measurements; DDPM and DDIM alternate in rounds. A sampler's time may be extrapolated
from a timed prefix of its reverse steps (every step costs the same model call); `*_timed_steps`
and `*_extrapolated` say so. `load_average_at_start/end` tell whether other processes competed.
Targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import DEVICE_NAMES, PRESETS, ConfigError, RunConfig, SampleConfig
from ..data.datasets import load_images
from ..diffusion.guidance import even_labels
from ..device import resolve_device, synchronize
from ..models import build_model, count_parameters
from ..models.embedding import sinusoidal_encoding
from ..diffusion.sampling import reverse_process
from ..diffusion.schedule import NoiseScheduler
from ..diffusion.solvers import DPMSolverPP2M, ddim_step, ddpm_step
from ..train.training import Trainer
from . import reference
from .flops import flops_per_image
from .noise_cost import measure_noise_streams

BENCH_VERSION = 1
MODEL_PRESETS = {"unet": "book", "improved_unet": "improved"}  # the model each preset trains
TARGETS = {  # from the project's issue; reported as booleans, never asserted in tests
    "cpu_unet_fraction_of_matmul": 0.75,
    "cpu_improved_unet_fraction_of_matmul": 0.65,
    "ddim50_over_ddpm1000": 1 / 15,
    "dpmpp2m20_speedup_over_book_ddpm": 45.0,   # 20 images, 20 steps vs the book's 1000-step loop
    "solver_overhead_fraction": 0.05,           # DPM-Solver++ step alone / one network evaluation
    "cpu_train_peak_rss_mb": 1900,  # issue 19: back under 1.9 GB (it read 1.96-2.15 GB with the eager imports)
    "gpu_speedup_vs_reference": 10.0,
    "guided_over_unguided_step": 2.0,   # classifier-free guidance: both halves in one batched pass
    "noise_streams_fraction": 0.05,     # per-image noise streams: extra cost / sampling time (20 steps)
}
GUIDANCE_PRESET = "improved-cfg"        # the conditional network whose guided step is timed
BENCH_GUIDANCE = 3.0                    # the book's γ


@dataclass(frozen=True)
class BenchPlan:
    """How much to time. `quick` fits in under a minute on 2 CPU cores; `full` in a few minutes."""
    mode: str = "full"
    batch_size: int = 128
    samples: int = 20
    train_warmup: int = 2
    train_steps: int = 8
    ddpm_timed_steps: int = 100        # of T = 1000, extrapolated
    ddim_steps: int = 50
    ddim_timed_steps: int = 50         # all of them
    few_steps: int = 20                # DPM-Solver++(2M), all timed
    sampling_rounds: int = 3           # DDPM and DDIM alternate; each keeps its best round
    reference_train_steps: int = 5
    reference_ddpm_timed_steps: int = 100
    matmul_size: int = 2048
    matmul_repeats: int = 10
    ablation_train_steps: int = 4      # per setting, alternating on/off
    ablation_sample_steps: int = 20    # DDIM steps per setting
    ablate: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "samples", "train_steps", "ddpm_timed_steps", "ddim_steps", "ddim_timed_steps",
                     "few_steps",
                     "sampling_rounds", "reference_train_steps", "reference_ddpm_timed_steps", "matmul_size",
                     "matmul_repeats",
                     "ablation_train_steps", "ablation_sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} = {value!r} is not allowed: it must be a whole number of at least 1")
        if self.train_warmup < 0:
            raise ConfigError(f"train_warmup = {self.train_warmup!r} is not allowed: it must be at least 0")


QUICK = BenchPlan(mode="quick", train_warmup=1, train_steps=2, ddpm_timed_steps=10, ddim_timed_steps=10,
                  sampling_rounds=1, reference_train_steps=2, reference_ddpm_timed_steps=10, matmul_repeats=3,
                  ablate=False)
FULL = BenchPlan()
# Every measurement once, as small as it goes: for tests of the plumbing. Its numbers mean nothing.
SMOKE = BenchPlan(mode="smoke", batch_size=4, samples=2, train_warmup=1, train_steps=1, ddpm_timed_steps=2,
                  ddim_steps=5, ddim_timed_steps=2, few_steps=3, sampling_rounds=1, reference_train_steps=1,
                  reference_ddpm_timed_steps=2, matmul_size=256, matmul_repeats=1, ablation_train_steps=1,
                  ablation_sample_steps=2)


# -- small helpers -----------------------------------------------------------------------------------
_sync = synchronize


def _r(x: float | None, digits: int = 4) -> float | None:
    """Round for the JSON to `digits` decimals, but keep at least 4 significant digits of small
    numbers (a ratio of 0.0018 matters); None for missing or non-finite values."""
    if x is None or not math.isfinite(x):
        return None
    if x != 0:
        digits = max(digits, 3 - math.floor(math.log10(abs(x))))
    return round(x, digits)


def release_memory() -> None:
    """Free what earlier measurements left behind, and hand glibc's free heap back to the OS, so
    the next peak RSS starts from the process itself rather than from old allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak just includes freed memory
        pass


class PeakMemory:
    """Peak memory of one measurement: CUDA's max_memory_allocated, else the process's peak RSS
    (VmHWM), reset before each measurement through /proc/self/clear_refs where Linux allows it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            self.kind = "process peak RSS since start (could not reset)"

    def read_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_status_mb("VmHWM")
        if peak is not None:
            return peak
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
        except (ImportError, OSError):
            return None


def _proc_status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return None


def current_memory_mb(device: torch.device) -> float | None:
    """Memory in use now: CUDA's memory_allocated, else the process RSS (what a peak starts from)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def _load_average() -> float | None:
    """The 1-minute load average: above the core count, other processes were competing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()})"


def matmul_gflops(device: torch.device, size: int, repeats: int) -> float:
    """Dense fp32 matmul rate: best of `repeats` size×size torch.mm, 2·n³ FLOPs each."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    torch.mm(a, b)  # warm-up: thread pool, BLAS dispatch, CUDA context
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def bench_images(n: int, data_root: str | None, synthetic: bool = False) -> tuple[torch.Tensor, str]:
    """The training images as uint8 (N, 1, 28, 28): FashionMNIST when present, else (or when asked)
    seeded random pixels; the speed of a step does not depend on the pixel values."""
    reason = "asked for"
    if not synthetic:
        try:
            images = load_images("fashion_mnist", "train", data_root).images
            return images, f"fashion_mnist train ({len(images)} images)"
        except Exception as exc:  # noqa: BLE001 - any missing or unreadable dataset: fall back, say so
            reason = f"dataset not loaded: {type(exc).__name__}"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(n, 1024), 1, 28, 28), generator=gen, dtype=torch.uint8)
    return images, f"synthetic uint8 ({len(images)} images; {reason})"


# -- training ----------------------------------------------------------------------------------------
class ProductTrainer:
    """The loop's `Trainer` for one config, fed batches in a seeded order as the loop feeds them:
    the bench times the very `Trainer.train_step` that trains."""

    def __init__(self, config: RunConfig, device: torch.device, images: torch.Tensor, batch_size: int):
        self.trainer = Trainer(config, device)
        self.model, self.batch_size = self.trainer.model, batch_size
        self.data = images.to(device)
        gen = torch.Generator().manual_seed(config.train.seed)
        self.order = torch.randperm(len(images), generator=gen).to(device)

    def step(self) -> torch.Tensor:
        per_epoch = max(1, len(self.data) // self.batch_size)
        i = self.trainer.step % per_epoch
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        return self.trainer.train_step(self.trainer.batch(self.data[idx]))


def _timed_steps(step_fns: list, warmup: int, steps: int, device: torch.device) -> list[list[float]]:
    """Warm each step function up, then time `steps` calls of each, interleaved (A, B, A, B, ...)
    so that a change of load on a shared machine hits every setting alike. Seconds per call."""
    for fn in step_fns:
        for _ in range(warmup):
            fn()
        _sync(device)
    times: list[list[float]] = [[] for _ in step_fns]
    if device.type == "cuda":  # time a block per setting: a sync per step would stall the GPU queue
        for k, fn in enumerate(step_fns):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[k] = [(time.perf_counter() - start) / steps] * steps
        return times
    for _ in range(steps):
        for k, fn in enumerate(step_fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def _train_entry(step_s: list[float], batch: int, train_flop: float, peak: float) -> dict:
    median = statistics.median(step_s)
    images_per_s = batch / median
    gflops = images_per_s * train_flop / 1e9
    return {"images_per_s": _r(images_per_s, 2), "step_s_median": _r(median), "step_s_min": _r(min(step_s)),
            "timed_steps": len(step_s), "achieved_gflops": _r(gflops, 2),
            "fraction_of_matmul": _r(gflops / peak) if peak else None}


def measure_training(config: RunConfig, device: torch.device, images: torch.Tensor, plan: BenchPlan,
                     peak_gflops: float, memory: PeakMemory) -> dict:
    """Training images/s of one preset's model through the product's step, with its peak memory."""
    train_flop = flops_per_image(build_model(config.model), train=True, batch=1,  # linear in the batch
                                 shape=config.data.shape)
    memory.reset()
    before = current_memory_mb(device)
    compile_start = time.perf_counter()
    trainer = ProductTrainer(config, device, images, plan.batch_size)
    first = None
    if config.train.compile:  # the first call compiles: report its cost separately
        trainer.step()
        _sync(device)
        first = time.perf_counter() - compile_start
    [step_s] = _timed_steps([trainer.step], plan.train_warmup, plan.train_steps, device)
    entry = {"preset": MODEL_PRESETS[config.model.name], "params": count_parameters(trainer.model),
             "train_gflop_per_image": _r(train_flop / 1e9), "batch_size": plan.batch_size}
    entry.update(_train_entry(step_s, plan.batch_size, train_flop, peak_gflops))
    entry["peak_memory_mb"] = _r(memory.read_mb(), 1)
    entry["memory_before_mb"] = _r(before, 1)  # the process before this model existed (torch, data)
    if first is not None:
        entry["compile_first_step_s"] = _r(first, 2)
    return entry


# -- sampling ----------------------------------------------------------------------------------------
SAMPLING_CHANNELS_LAST = False  # what `reverse_process` uses when the CLI and the dashboard do not say


def time_sampler(model: torch.nn.Module, scheduler: NoiseScheduler, config: SampleConfig, timed_steps: int,
                 device: torch.device, pixel_range: str, channels_last: bool) -> dict:
    """Seconds for `config` through the product's `reverse_process`, from its first `timed_steps`
    reverse steps (every step costs one model call, so the rest is extrapolated)."""
    total = config.resolved_steps(scheduler.num_timesteps)
    timed = min(timed_steps, total)
    model.eval()
    with torch.inference_mode():  # warm-up forward at the sampling batch size
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.zeros(config.n, 1, 28, 28, device=device).contiguous(memory_format=memory_format)
        model(x, torch.full((config.n,), scheduler.num_timesteps, device=device, dtype=torch.long))
    _sync(device)
    start = time.perf_counter()
    steps = reverse_process(model, scheduler, config, pixel_range=pixel_range, device=device,
                            channels_last=channels_last)
    for _ in itertools.islice(steps, timed):
        pass
    steps.close()
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"steps": total, "timed_steps": timed, "extrapolated": timed < total,
            "seconds": elapsed / timed * total}


def measure_sampling(config: RunConfig, device: torch.device, plan: BenchPlan, channels_last: bool) -> dict:
    """DDPM at T, DDIM at `plan.ddim_steps` and DPM-Solver++(2M) at `plan.few_steps` for `plan.samples`
    images (random weights: the speed of a reverse step does not depend on them). The samplers
    alternate, `plan.sampling_rounds` times, and each keeps its best round, so a burst of load
    cannot tilt their ratios."""
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    scheduler = NoiseScheduler(config.schedule)
    n, rounds = plan.samples, plan.sampling_rounds
    ddim_steps = min(plan.ddim_steps, scheduler.num_timesteps)
    ddpm_config = SampleConfig(sampler="ddpm", n=n, batch_size=n)
    ddim_config = SampleConfig(sampler="ddim", steps=ddim_steps, n=n, batch_size=n)
    few_steps = min(plan.few_steps, scheduler.num_timesteps)
    dpm_config = SampleConfig(sampler="dpmpp2m", steps=few_steps, n=n, batch_size=n)
    ddpm_runs, ddim_runs, dpm_runs = [], [], []
    for _ in range(rounds):
        ddpm_runs.append(time_sampler(model, scheduler, ddpm_config, max(1, plan.ddpm_timed_steps // rounds),
                                      device, config.train.pixel_range, channels_last))
        ddim_runs.append(time_sampler(model, scheduler, ddim_config, plan.ddim_timed_steps,
                                      device, config.train.pixel_range, channels_last))
        dpm_runs.append(time_sampler(model, scheduler, dpm_config, few_steps, device, config.train.pixel_range,
                                     channels_last))
    ddpm = min(ddpm_runs, key=lambda run: run["seconds"])
    ddim = min(ddim_runs, key=lambda run: run["seconds"])
    dpm = min(dpm_runs, key=lambda run: run["seconds"])
    return {"n": n, "rounds": rounds, "statistic": "best round",
            "ddpm_steps": ddpm["steps"], "ddpm_s": _r(ddpm["seconds"], 3), "ddpm_timed_steps": ddpm["timed_steps"],
            "ddpm_extrapolated": ddpm["extrapolated"],
            "ddim_steps": ddim["steps"], "ddim_s": _r(ddim["seconds"], 3), "ddim_timed_steps": ddim["timed_steps"],
            "ddim_extrapolated": ddim["extrapolated"],
            "ddim_over_ddpm": _r(ddim["seconds"] / ddpm["seconds"]),
            "dpmpp2m_steps": dpm["steps"], "dpmpp2m_s": _r(dpm["seconds"], 3),
            "dpmpp2m_over_ddpm": _r(dpm["seconds"] / ddpm["seconds"]),
            "network_eval_s": _r(ddim["seconds"] / ddim["steps"], 4)}  # one reverse step ≈ one forward


def measure_guidance(device: torch.device, plan: BenchPlan, channels_last: bool) -> dict:
    """Seconds per DDIM step of the improved-cfg network for `plan.samples` images: unguided (γ = 1,
    one pass over B) against guided (γ = 3, one pass over [x; x], 2B). Alternating rounds, best of
    each: guidance should cost at most twice the unguided step, less where a pass of B leaves the
    device idle."""
    config = PRESETS[GUIDANCE_PRESET]
    torch.manual_seed(0)
    model = build_model(config.model).to(device).eval()
    scheduler = NoiseScheduler(config.schedule)
    n = plan.samples
    timed = min(plan.ddim_timed_steps, plan.ddim_steps, scheduler.num_timesteps)
    sample_config = SampleConfig(sampler="ddim", steps=min(plan.ddim_steps, scheduler.num_timesteps), n=n, batch_size=n)
    labels = even_labels(n, config.model.num_classes)

    def seconds_per_step(guidance: float) -> float:
        _sync(device)
        start = time.perf_counter()
        steps = reverse_process(model, scheduler, sample_config, pixel_range=config.train.pixel_range, device=device,
                                channels_last=channels_last, labels=labels, guidance=guidance,
                                prediction=config.train.prediction)
        for _ in itertools.islice(steps, timed):
            pass
        steps.close()
        _sync(device)
        return (time.perf_counter() - start) / timed

    seconds_per_step(1.0), seconds_per_step(BENCH_GUIDANCE)  # warm-up at both batch sizes
    unguided, guided_s = [], []
    for _ in range(plan.sampling_rounds):
        unguided.append(seconds_per_step(1.0))
        guided_s.append(seconds_per_step(BENCH_GUIDANCE))
    return {"preset": GUIDANCE_PRESET, "sampler": "ddim", "n": n, "timed_steps": timed, "guidance": BENCH_GUIDANCE,
            "rounds": plan.sampling_rounds, "statistic": "best round",
            "unguided_step_s": _r(min(unguided), 5), "guided_step_s": _r(min(guided_s), 5),
            "guided_over_unguided": _r(min(guided_s) / min(unguided), 3)}


def scheduler_step_overhead(device: torch.device, n: int, repeats: int = 200) -> dict:
    """Microseconds of one DDPM, DDIM and DPM-Solver++(2M) step alone (no model): the per-step Python
    and small-kernel cost every reverse step pays on top of the network."""
    scheduler = NoiseScheduler(PRESETS["book"].schedule)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    eps = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    dpm = DPMSolverPP2M(scheduler, SampleConfig(sampler="dpmpp2m", steps=50), (-1.0, 1.0), sde=False)

    def dpm_step(t: int) -> torch.Tensor:  # a second-order step: history at t + 20, target t − 20
        s, x0 = max(t - 20, 1), scheduler.pred_x0(x, t, eps).clamp(-1.0, 1.0)
        return dpm.update(t, s, x, dpm.data_estimate(t, s, x0, min(t + 20, 1000), x), None)

    out = {}
    with torch.inference_mode():
        for name, fn in (("ddpm_step_us", lambda t: ddpm_step(scheduler, eps, t, x,
                                                               noise=lambda: torch.randn(x.shape, generator=gen))),
                         ("ddim_step_us", lambda t: ddim_step(scheduler, eps, t, max(t - 20, 0), x,
                                                              clip_range=(-1.0, 1.0))),
                         ("dpmpp2m_step_us", dpm_step)):
            fn(500)
            _sync(device)
            start = time.perf_counter()
            for k in range(repeats):
                fn(900 - k)  # t below T: the DPM step needs a previous timestep above t
            _sync(device)
            out[name] = _r((time.perf_counter() - start) / repeats * 1e6, 1)
    return out


# -- the book's code -----------------------------------------------------------------------------------
def measure_reference(config: RunConfig, device: torch.device, images: torch.Tensor, plan: BenchPlan,
                      peak_gflops: float, sample_channels_last: bool) -> dict:
    """The book's step-9 code (core/bench/reference.py) against the product's book preset, interleaved so
    that both see the same load: training steps alternate (the book's DataLoader step, then the
    product's step), and DDPM sampling alternates blocks of reverse steps of the two samplers."""
    torch.manual_seed(0)
    book_model = reference.UNet().to(device)
    train_flop = flops_per_image(reference.UNet(), train=True, batch=1)
    diffuser = reference.Diffuser(config.schedule.timesteps, config.schedule.beta_start, config.schedule.beta_end,
                                  device=device)
    optimizer = torch.optim.Adam(book_model.parameters(), lr=1e-3)
    loader = reference.make_dataloader(images, plan.batch_size)
    batches = iter(loader)

    def book_step() -> None:
        nonlocal batches
        try:
            x, _ = next(batches)
        except StopIteration:  # a new epoch, as the book's outer loop would start
            batches = iter(loader)
            x, _ = next(batches)
        reference.train_step(book_model, optimizer, diffuser, x)

    product = ProductTrainer(config, device, images, plan.batch_size)
    book_s, product_s = _timed_steps([book_step, product.step], max(1, plan.train_warmup - 1),
                                     plan.reference_train_steps, device)
    del product
    entry = {"what": "the book's step-9 code (core/reference.py): Python-loop time encoding, DataLoader + "
                     "ToTensor per image, eval()/train() and no_grad per reverse step, NCHW fp32",
             "train_gflop_per_image": _r(train_flop / 1e9), "batch_size": plan.batch_size}
    entry.update(_train_entry(book_s, plan.batch_size, train_flop, peak_gflops))
    entry["product_images_per_s_interleaved"] = _r(plan.batch_size / statistics.median(product_s), 2)
    entry["train_speedup"] = _r(statistics.median(book_s) / statistics.median(product_s), 3)

    # DDPM: blocks of reverse steps, book then product, each extrapolated to T; medians.
    n, total = plan.samples, diffuser.num_timesteps
    timed = min(plan.reference_ddpm_timed_steps, total)
    blocks = min(4, timed)
    per_block = max(1, timed // blocks)
    torch.manual_seed(0)
    product_model = build_model(config.model).to(device)
    scheduler = NoiseScheduler(config.schedule)
    diffuser.sample(book_model, (n, 1, 28, 28), num_steps=1)  # warm-up
    book_ddpm, product_ddpm = [], []
    for _ in range(blocks):
        _sync(device)
        start = time.perf_counter()
        diffuser.sample(book_model, (n, 1, 28, 28), num_steps=per_block)
        _sync(device)
        book_ddpm.append((time.perf_counter() - start) / per_block * total)
        product_ddpm.append(time_sampler(product_model, scheduler, SampleConfig(sampler="ddpm", n=n, batch_size=n),
                                         per_block, device, config.train.pixel_range,
                                         sample_channels_last)["seconds"])
    book_ddpm_s, product_ddpm_s = statistics.median(book_ddpm), statistics.median(product_ddpm)
    entry.update({"n": n, "ddpm_steps": total, "ddpm_s": _r(book_ddpm_s, 3),
                  "ddpm_timed_steps": blocks * per_block, "ddpm_extrapolated": blocks * per_block < total,
                  "product_ddpm_s_interleaved": _r(product_ddpm_s, 3),
                  "ddpm_speedup": _r(book_ddpm_s / product_ddpm_s, 3)})
    return entry


def time_encoding_us(batch: int, device: torch.device, repeats: int = 20) -> dict:
    """The book's per-sample Python loop against the product's broadcast, for one batch."""
    t = torch.randint(1, 1001, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name, fn in (("book_loop_us", lambda: reference.pos_encoding(t, 100)),
                     ("product_us", lambda: sinusoidal_encoding(t, 100))):
        fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        out[name] = _r((time.perf_counter() - start) / repeats * 1e6, 1)
    return out


# -- fast paths on / off -------------------------------------------------------------------------------
def ablate_channels_last(config: RunConfig, device: torch.device, images: torch.Tensor, plan: BenchPlan) -> dict:
    """channels_last off and on, for one model's training (steps interleaved) and DDIM sampling."""
    trainers = [ProductTrainer(replace(config, train=replace(config.train, channels_last=flag)), device, images,
                               plan.batch_size) for flag in (False, True)]
    off, on = _timed_steps([tr.step for tr in trainers], 1, plan.ablation_train_steps, device)
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    scheduler = NoiseScheduler(config.schedule)
    steps = min(plan.ablation_sample_steps, scheduler.num_timesteps)
    cfg = SampleConfig(sampler="ddim", steps=steps, n=plan.samples, batch_size=plan.samples)
    sample_s = {False: [], True: []}
    for _ in range(2):  # alternate, keep the best of two per setting
        for flag in (False, True):
            sample_s[flag].append(time_sampler(model, scheduler, cfg, steps, device, config.train.pixel_range,
                                               flag)["seconds"])
    return {"train_step_s_off": _r(statistics.median(off)), "train_step_s_on": _r(statistics.median(on)),
            "train_speedup_on_vs_off": _r(statistics.median(off) / statistics.median(on), 3),
            "sample_s_off": _r(min(sample_s[False]), 3), "sample_s_on": _r(min(sample_s[True]), 3),
            "sample_speedup_on_vs_off": _r(min(sample_s[False]) / min(sample_s[True]), 3),
            "timed_train_steps": plan.ablation_train_steps, "timed_ddim_steps": steps}


# -- the whole benchmark ---------------------------------------------------------------------------------
def run_bench(plan: BenchPlan = FULL, device: str = "auto", *, channels_last: bool | None = None,
              compile: bool | None = None, data_root: str | None = None, synthetic_data: bool = False,
              reference: bool = True, log=None) -> dict:
    """Measure everything in one process and return the JSON-ready result."""
    began = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training loop sets it
    say = (lambda message: log(f"{time.perf_counter() - began:6.1f} s  {message}")) if log else (lambda message: None)
    memory = PeakMemory(dev)
    sample_cl = SAMPLING_CHANNELS_LAST if channels_last is None else channels_last

    def preset_config(model_name: str) -> RunConfig:
        config = PRESETS[MODEL_PRESETS[model_name]]
        changes = {"device": device}
        if channels_last is not None:
            changes["channels_last"] = channels_last
        if compile is not None:
            changes["compile"] = compile
        return replace(config, train=replace(config.train, **changes))

    configs = {name: preset_config(name) for name in MODEL_PRESETS}
    result: dict = {"bench_version": BENCH_VERSION, "mode": plan.mode}
    result["device"] = {"type": dev.type, "name": device_name(dev), "torch": torch.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "load_average_at_start": _load_average()}
    train_cfg = configs["unet"].train
    result["flags"] = {"train_channels_last": train_cfg.channels_last, "sample_channels_last": sample_cl,
                       "compile": train_cfg.compile, "autocast": "bfloat16" if dev.type == "cuda" else None,
                       "cudnn_benchmark": dev.type == "cuda", "sampling_inference_mode": True,
                       "mkldnn": torch.backends.mkldnn.is_available()}

    # The matmul rate is measured in rounds between the other measurements and the best round
    # counts: a burst of load during one round would understate the device and overstate every
    # fraction of it.
    say("matmul rate")
    matmul_rounds = [matmul_gflops(dev, plan.matmul_size, plan.matmul_repeats)]
    result["matmul"] = None  # filled in at the end
    images, data_desc = bench_images(plan.batch_size, data_root, synthetic_data)
    result["data"] = data_desc
    result["memory_kind"] = memory.kind

    result["train"] = {}
    for name, config in configs.items():
        say(f"training {name}")
        result["train"][name] = measure_training(config, dev, images, plan, max(matmul_rounds), memory)
        matmul_rounds.append(matmul_gflops(dev, plan.matmul_size, plan.matmul_repeats))
    result["sampling"] = {}
    for name, config in configs.items():
        say(f"sampling {name}")
        result["sampling"][name] = measure_sampling(config, dev, plan, sample_cl)
    result["scheduler_step_overhead"] = overhead = scheduler_step_overhead(dev, plan.samples)
    # The solver's own work per step against one network evaluation of the book's UNet, same N.
    overhead["dpmpp2m_fraction_of_network_eval"] = _r(
        overhead["dpmpp2m_step_us"] / 1e6 / result["sampling"]["unet"]["network_eval_s"])
    say("per-image noise streams against batched noise")
    result["noise_streams"] = measure_noise_streams(dev, plan.samples, result["sampling"]["unet"]["network_eval_s"])
    say("guided against unguided sampling")
    result["guidance"] = measure_guidance(dev, plan, sample_cl)

    if reference:
        say("the book's reference code, interleaved with the product's")
        ref = measure_reference(configs["unet"], dev, images, plan, max(matmul_rounds), sample_cl)
        ref["ddim50_speedup_over_book_ddpm"] = _r(ref["ddpm_s"] / result["sampling"]["unet"]["ddim_s"], 3)
        ref["dpmpp2m_speedup_over_book_ddpm"] = _r(ref["ddpm_s"] / result["sampling"]["unet"]["dpmpp2m_s"], 3)
        ref["time_encoding"] = time_encoding_us(plan.batch_size, dev)
        result["reference"] = ref
    else:
        result["reference"] = None

    if plan.ablate:
        result["fast_paths"] = {"channels_last": {}}
        for name, config in configs.items():
            say(f"channels_last on/off: {name}")
            result["fast_paths"]["channels_last"][name] = ablate_channels_last(config, dev, images, plan)
    else:
        result["fast_paths"] = None

    say("matmul rate, last round")
    matmul_rounds.append(matmul_gflops(dev, plan.matmul_size, plan.matmul_repeats))
    best = max(matmul_rounds)
    result["matmul"] = {"size": plan.matmul_size, "dtype": "float32", "gflops": _r(best, 2),
                        "rounds_gflops": [_r(g, 2) for g in matmul_rounds], "repeats_per_round": plan.matmul_repeats,
                        "statistic": "best of all rounds (start, after each training, end)"}
    for entry in [*result["train"].values(), result["reference"]]:
        if entry is not None:
            entry["fraction_of_matmul"] = _r(entry["achieved_gflops"] / best)
    result["targets"] = _targets(result, dev)
    result["device"]["load_average_at_end"] = _load_average()  # other processes' load skews the numbers
    result["elapsed_s"] = _r(time.perf_counter() - began, 1)
    return result


def _targets(result: dict, dev: torch.device) -> dict:
    train, sampling, ref = result["train"], result["sampling"], result["reference"]
    cpu = dev.type == "cpu"
    worst_ratio = max(s["ddim_over_ddpm"] for s in sampling.values())
    peak_train_mb = max(e["peak_memory_mb"] or 0.0 for e in train.values())
    out = {
        "unet_fraction_of_matmul": train["unet"]["fraction_of_matmul"],
        "unet_fraction_target": TARGETS["cpu_unet_fraction_of_matmul"] if cpu else None,
        "unet_fraction_met": train["unet"]["fraction_of_matmul"] >= TARGETS["cpu_unet_fraction_of_matmul"]
        if cpu else None,
        "improved_unet_fraction_of_matmul": train["improved_unet"]["fraction_of_matmul"],
        "improved_unet_fraction_target": TARGETS["cpu_improved_unet_fraction_of_matmul"] if cpu else None,
        "improved_unet_fraction_met": train["improved_unet"]["fraction_of_matmul"]
        >= TARGETS["cpu_improved_unet_fraction_of_matmul"] if cpu else None,
        "ddim50_over_ddpm1000_worst": worst_ratio,
        "ddim50_over_ddpm1000_target": _r(TARGETS["ddim50_over_ddpm1000"]),
        "ddim50_over_ddpm1000_met": worst_ratio <= TARGETS["ddim50_over_ddpm1000"],
        "cpu_train_peak_rss_mb": peak_train_mb if cpu else None,
        "cpu_train_peak_rss_target_mb": TARGETS["cpu_train_peak_rss_mb"] if cpu else None,
        "cpu_train_peak_rss_met": peak_train_mb < TARGETS["cpu_train_peak_rss_mb"] if cpu else None,
        "gpu_speedup_vs_reference": None, "gpu_speedup_target": None, "gpu_speedup_met": None,
        "solver_overhead_fraction": result["scheduler_step_overhead"]["dpmpp2m_fraction_of_network_eval"],
        "solver_overhead_target": TARGETS["solver_overhead_fraction"],
        "solver_overhead_met": result["scheduler_step_overhead"]["dpmpp2m_fraction_of_network_eval"]
        < TARGETS["solver_overhead_fraction"],
        "dpmpp2m_speedup_over_book_ddpm": ref["dpmpp2m_speedup_over_book_ddpm"] if ref else None,
        "dpmpp2m_speedup_target": TARGETS["dpmpp2m20_speedup_over_book_ddpm"],
        "dpmpp2m_speedup_met": ref["dpmpp2m_speedup_over_book_ddpm"] >= TARGETS["dpmpp2m20_speedup_over_book_ddpm"]
        if ref else None,
        "guided_over_unguided_step": result["guidance"]["guided_over_unguided"],
        "guided_over_unguided_target": TARGETS["guided_over_unguided_step"],
        "guided_over_unguided_met": result["guidance"]["guided_over_unguided"] <= TARGETS["guided_over_unguided_step"],
        "noise_streams_fraction": result["noise_streams"]["extra_fraction_of_sampling"],
        "noise_streams_target": TARGETS["noise_streams_fraction"],
        "noise_streams_met": result["noise_streams"]["extra_fraction_of_sampling"] <= TARGETS["noise_streams_fraction"],
    }
    if dev.type == "cuda" and ref is not None:
        out.update(gpu_speedup_vs_reference=ref["train_speedup"],
                   gpu_speedup_target=TARGETS["gpu_speedup_vs_reference"],
                   gpu_speedup_met=ref["train_speedup"] >= TARGETS["gpu_speedup_vs_reference"])
    return out


# -- CLI -------------------------------------------------------------------------------------------------
def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: use on or off")
    return value == "on"


def _at_least_one(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: give a whole number of at least 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: give a whole number of at least 1")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer timed steps: under a minute on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="every measurement once at toy sizes (tests the "
                      "plumbing; its numbers mean nothing)")
    parser.add_argument("--device", choices=DEVICE_NAMES, default="auto", help="where to measure")
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument("--batch-size", type=_at_least_one, default=None, help="training batch (default 128)")
    parser.add_argument("--samples", type=_at_least_one, default=None, help="images per sampling run (default 20)")
    parser.add_argument("--channels-last", type=_on_off, default=None,
                        help="on/off for training and sampling (default: the product's defaults)")
    parser.add_argument("--compile", type=_on_off, default=None, help="torch.compile the training model (on/off)")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the book's original code")
    parser.add_argument("--no-ablation", action="store_true", help="skip the channels_last on/off comparison")
    parser.add_argument("--data-root", help="where FashionMNIST lies (else synthetic pixels are used)")
    parser.add_argument("--synthetic-data", action="store_true", help="random pixels instead of FashionMNIST")
    parser.add_argument("--verbose", action="store_true", help="say on stderr what is being measured")
    parser.add_argument("--data-load", type=_at_least_one, metavar="N", default=None,
                        help="instead: load a generated folder of N 32x32 RGB PNGs, first time and from the cache "
                        "(issue 20's target is 50000 in <= 60 s, then <= 3 s)")
    parser.add_argument("--dataset", choices=("fashion_mnist", "mnist", "cifar10"), default=None,
                        help="instead: training speed only, at this dataset's shape (with --image-size, --channels)")
    parser.add_argument("--image-size", type=_at_least_one, default=None, metavar="S",
                        help="instead: training speed only, at S x S (16-64, a multiple of 4)")
    parser.add_argument("--channels", type=_at_least_one, choices=(1, 3), default=None,
                        help="instead: training speed only, with 1 or 3 channels")
    parser.add_argument("--ddp", type=_at_least_one, default=None, metavar="N",
                        help="instead: data-parallel scaling of training, N processes against one (gloo on CPU, "
                        "NCCL on N GPUs)")
    parser.add_argument("--ddp-model", choices=sorted(MODEL_PRESETS), default="unet",
                        help="the network --ddp trains (default the book's unet)")


def plan_of(args: argparse.Namespace) -> BenchPlan:
    """The plan the flags ask for: --smoke, --quick or the full one, with --batch-size / --samples."""
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    changes = {"ablate": plan.ablate and not args.no_ablation}
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.samples is not None:
        changes["samples"] = args.samples
    return replace(plan, **changes)


def run(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    log = (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True)) if args.verbose else None
    result = run_bench(plan, args.device, channels_last=args.channels_last, compile=args.compile,
                       data_root=args.data_root, synthetic_data=args.synthetic_data,
                       reference=not args.no_reference, log=log)
    return print_result(result, args.out)


def print_result(result: dict, out: str | None) -> int:
    """Print the bench's JSON object, and write the same text to `out` when given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return 0
