"""The training loop (`train_run`) and a background job around it (`TrainingJob`).

Network, diffusion process and trainer are separate: the loop only draws batches, noises them
with the scheduler and regresses the model's ε̂ on ε (the book's MSE). It writes everything to
the run folder, so the CLI and the dashboard share one engine, and a run killed at any moment
loses at most the work since its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import runs
from .config import ConfigError, RunConfig, SampleConfig
from .data import ImageSet, load_images, to_model_range
from .export import save_grid
from .models import build_model
from .sampling import sample
from .schedule import NoiseScheduler

GRID_SAMPLES = 16
GRID_SEED = 1234


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequested(Exception):
    """Raised inside the loop when stop() was called; the loop saves and ends cleanly."""


# -- devices -----------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """auto -> CUDA, then MPS, then CPU; an explicit device that is missing is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' is not allowed: no CUDA GPU is visible on this machine; "
                          "use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("device = 'mps' is not allowed: Apple's MPS backend is not available here; "
                          "use auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device = {name!r} is not allowed: choose one of auto, cpu, cuda, mps")
    return torch.device(name)


# -- EMA ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1 − d)·θ.

    Buffers (BatchNorm running stats) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm up the decay so early EMA weights are not dominated by the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


# -- progress ----------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What a job reports; copied out under a lock, so readers never see a half-updated one."""
    state: str = "starting"            # starting, running, stopping, finished, stopped, failed
    run_name: str = ""
    run_dir: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    latest_grid: str | None = None
    device: str = ""
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


ProgressFn = Callable[[Progress], None]


# -- the loop ----------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    t = config.train
    kind = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    # Adam's weight_decay is an L2 term inside the gradient; AdamW's is decoupled (Loshchilov &
    # Hutter 2019). The same number means different things, which is the blog's point.
    return kind(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _lr_at(step: int, config: RunConfig) -> float:
    warmup = config.train.warmup_steps
    return config.train.lr * min(1.0, (step + 1) / warmup) if warmup else config.train.lr


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, n_images // batch_size)  # drop the ragged last batch: every step sees a full batch


def total_steps_for(config: RunConfig, n_images: int) -> int:
    per_epoch = steps_per_epoch(n_images, config.train.batch_size)
    limits = [config.train.epochs * per_epoch] if config.train.epochs else []
    if config.train.max_steps:
        limits.append(config.train.max_steps)
    return min(limits) if limits else 0  # 0: bounded by the time budget alone


def _divergence_message(loss: float, step: int, config: RunConfig) -> str:
    decay = config.train.lr * config.train.weight_decay
    if config.train.optimizer == "adamw" and decay > 1:
        # AdamW multiplies the weights by (1 - lr·wd) each step: past 1 that factor flips their sign,
        # past 2 it grows them geometrically until they overflow.
        hint = (f"lr × weight_decay = {decay:g} > 1, so AdamW's decoupled decay multiplies the weights by "
                f"{1 - decay:g} every step and they blow up; lower lr or weight_decay (e.g. 2e-3 and 0.01)")
    else:
        hint = (f"the learning rate ({config.train.lr:g}) is probably too high; try 10x lower"
                if config.train.lr > 3e-3 else
                "try a lower learning rate or gradient clipping (--grad-clip 1.0)")
    return f"loss became {loss} at step {step}: training diverged; {hint}"


def training_step(model: nn.Module, forward: Callable, optimizer: torch.optim.Optimizer, x_0: torch.Tensor,
                  alpha_bars: torch.Tensor, *, lr: float, grad_clip: float = 0.0, autocast=None,
                  ema: EMA | None = None, step: int = 0) -> torch.Tensor:
    """One optimisation step on a clean batch x_0 (B,1,28,28) in model range: draw t and ε, noise
    x_0 to x_t, regress ε̂ on ε (the book's MSE), step the optimizer and the EMA.

    `forward` is the model or its torch.compile'd wrapper; `alpha_bars` is float32 on x_0's device;
    `step` counts the steps taken before this one. Returns the loss as a 0-d tensor, unsynced.
    The loop and `python -m core bench` both call this, so the benchmark times the product's step.
    """
    timesteps = torch.randint(1, len(alpha_bars) + 1, (len(x_0),), device=x_0.device)
    noise = torch.randn_like(x_0)
    alpha_bar = alpha_bars[timesteps - 1].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise  # scheduler.add_noise, fused
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast if autocast is not None else _nullcontext():
        eps = forward(x_t, timesteps)
    loss = F.mse_loss(eps.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update(model, step + 1)
    return loss


def train_run(run_dir: Path, *, resume: bool = False, images: ImageSet | None = None,
              data_root: str | None = None, on_progress: ProgressFn | None = None,
              stop_event: threading.Event | None = None) -> Progress:
    """Train the run in `run_dir` (created with runs.create_run) until it finishes or is stopped.

    Returns the final Progress; raises on failure after marking the run failed in status.json.
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    progress = Progress(run_name=run_dir.name, run_dir=str(run_dir))
    try:
        result = _train(run_dir, config, resume, images, data_root, on_progress, stop_event, progress)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, (TrainingDiverged, ConfigError, runs.RunError)) else \
            f"{type(exc).__name__}: {exc}"
        progress.state, progress.error = "failed", message
        runs.write_status(run_dir, "failed", error=message, step=progress.step)
        if on_progress:
            on_progress(progress)
        raise
    return result


def _train(run_dir: Path, config: RunConfig, resume: bool, images: ImageSet | None, data_root: str | None,
           on_progress: ProgressFn | None, stop_event: threading.Event | None, progress: Progress) -> Progress:
    t = config.train
    device = resolve_device(t.device)
    progress.device = str(device)
    torch.manual_seed(t.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 28x28 shapes: autotuning pays off at once

    def report() -> None:
        if on_progress:
            on_progress(progress)

    progress.message = "loading data"
    report()
    if images is None:
        images = load_images(t.dataset, "train", data_root)
    data = images.images[: t.limit_images] if t.limit_images else images.images
    if not torch.is_tensor(data) or data.dtype != torch.uint8 or tuple(data.shape[1:]) != (28, 28):
        # Floats in [0, 1] would be divided by 255 again and train on near-black images, silently.
        got = f"{data.dtype} {tuple(data.shape)}" if torch.is_tensor(data) else type(data).__name__
        raise ConfigError(f"images = {got} is not allowed: training expects uint8 images of shape "
                          "(N, 28, 28) with pixels 0..255 (see core.data.ImageSet)")
    if t.batch_size > len(data):
        raise ConfigError(f"batch_size = {t.batch_size} is not allowed: it exceeds the {len(data)} "
                          "training images; lower it")
    data = data.to(device)  # the whole dataset as one uint8 tensor on the device (47 MB for 60k)
    per_epoch = steps_per_epoch(len(data), t.batch_size)
    total = total_steps_for(config, len(data))

    scheduler = NoiseScheduler(config.schedule)
    model = build_model(config.model).to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, config)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None

    step, epoch_start, elapsed_before = 0, 0, 0.0
    if resume:
        state = _load_checkpoint(run_dir, model, optimizer, ema)
        step, elapsed_before = state["step"], state["elapsed_s"]
        epoch_start = step // per_epoch
        runs.truncate_metrics(run_dir, step)
    forward = torch.compile(model) if t.compile else model
    alpha_bars = scheduler.alpha_bars.to(device=device, dtype=torch.float32)
    metrics = runs.MetricsWriter(run_dir / "metrics.csv")
    for row in runs.read_metrics(run_dir):
        progress.steps.append(int(row["step"]))
        progress.losses.append(row["loss"])

    progress.total_steps, progress.step, progress.epochs = total, step, t.epochs
    progress.state, progress.message = "running", ""
    runs.write_status(run_dir, "running", step=step)
    report()

    start_time = time.perf_counter()
    last_checkpoint = last_heartbeat = start_time
    window_loss, window_count, window_start, window_images = 0.0, 0, start_time, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    gen = torch.Generator(device="cpu")

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    def checkpoint(epoch: int) -> None:
        _save_checkpoint(run_dir, model, optimizer, ema, step, epoch, elapsed(), config, device)

    def out_of_budget() -> bool:
        return (total and step >= total) or (t.time_budget_s and elapsed() >= t.time_budget_s)

    stopped = False
    epoch = epoch_start
    model.train()
    try:
        while not out_of_budget():
            # The permutation of an epoch depends only on (seed, epoch), so a resumed run
            # continues the very same epoch where the checkpoint left it.
            gen.manual_seed(t.seed * 100_003 + epoch)
            order = torch.randperm(len(data), generator=gen).to(device)
            first = step - epoch * per_epoch if step > epoch * per_epoch else 0
            progress.epoch = epoch + 1
            for i in range(first, per_epoch):
                if stop_event is not None and stop_event.is_set():
                    raise StopRequested
                idx = order[i * t.batch_size:(i + 1) * t.batch_size]
                x_0 = to_model_range(data[idx], t.pixel_range).contiguous(memory_format=memory_format)  # (B,1,28,28)
                lr = _lr_at(step, config)
                loss = training_step(model, forward, optimizer, x_0, alpha_bars, lr=lr, grad_clip=t.grad_clip,
                                     autocast=autocast, ema=ema, step=step)
                step += 1
                window_loss += loss.detach()
                window_count += 1
                window_images += len(idx)

                if step % t.log_every == 0 or step == total:
                    mean_loss = float(window_loss / window_count)  # one device sync per log row
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(_divergence_message(mean_loss, step, config))
                    now = time.perf_counter()
                    ips = window_images / max(now - window_start, 1e-9)
                    metrics.write({"step": step, "epoch": epoch + 1, "loss": mean_loss, "lr": lr,
                                   "elapsed_s": elapsed(), "images_per_s": ips})
                    progress.steps.append(step)
                    progress.losses.append(mean_loss)
                    progress.step, progress.images_per_s, progress.elapsed_s = step, ips, elapsed()
                    progress.eta_s = _eta(progress, t.time_budget_s, t.batch_size)
                    window_loss, window_count, window_start, window_images = 0.0, 0, now, 0
                    report()
                    if now - last_heartbeat > 10:
                        runs.write_status(run_dir, "running", step=step)
                        last_heartbeat = now
                if t.checkpoint_every_s and time.perf_counter() - last_checkpoint >= t.checkpoint_every_s:
                    checkpoint(epoch)
                    last_checkpoint = time.perf_counter()
                if out_of_budget():
                    break
            else:
                epoch += 1
                checkpoint(epoch)
                last_checkpoint = time.perf_counter()
                if t.sample_every_epochs and epoch % t.sample_every_epochs == 0 and not out_of_budget():
                    progress.latest_grid = str(_preview_grid(run_dir, model, ema, scheduler, config, device,
                                                             f"epoch_{epoch:03d}.png"))
                    report()
    except StopRequested:
        stopped = True
    finally:
        metrics.close()

    progress.step, progress.elapsed_s = step, elapsed()
    progress.state, progress.message = "stopping" if stopped else "running", "saving"
    report()
    checkpoint(epoch)
    if step > 0:
        progress.latest_grid = str(_preview_grid(run_dir, model, ema, scheduler, config, device, "final.png"))
    progress.state, progress.message, progress.eta_s = ("stopped" if stopped else "finished"), "", 0.0
    runs.write_status(run_dir, progress.state, step=step)
    report()
    return progress


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _eta(progress: Progress, budget_s: float, batch: int) -> float | None:
    candidates = []
    if progress.total_steps and progress.images_per_s > 0:
        candidates.append((progress.total_steps - progress.step) * batch / progress.images_per_s)
    if budget_s:
        candidates.append(max(0.0, budget_s - progress.elapsed_s))
    return min(candidates) if candidates else None


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
                     step: int, epoch: int, elapsed_s: float, config: RunConfig, device: torch.device) -> None:
    meta = {"step": step, "epoch": epoch}
    runs.save_weights(run_dir / "model.safetensors", model, meta)
    if ema is not None:
        runs.save_weights(run_dir / "ema.safetensors", ema.model, meta)
    runs.save_optimizer(run_dir / "optimizer.safetensors", optimizer)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    # state.json goes last: it names the step of a complete checkpoint.
    runs.atomic_write_text(run_dir / "state.json", json.dumps(
        {"step": step, "epoch": epoch, "elapsed_s": elapsed_s, "meta": {"hardware": hardware,
                                                                         "torch": torch.__version__}}))


def _load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: EMA | None) -> dict:
    name = run_dir.name
    if not (run_dir / "model.safetensors").exists():
        return {"step": 0, "elapsed_s": 0.0}  # resuming a run that never checkpointed: start over
    runs.load_weights(run_dir / "model.safetensors", model, name)
    if ema is not None:
        ema_file = run_dir / "ema.safetensors"
        runs.load_weights(ema_file if ema_file.exists() else run_dir / "model.safetensors", ema.model, name)
    if (run_dir / "optimizer.safetensors").exists():
        runs.load_optimizer(run_dir / "optimizer.safetensors", optimizer, name)
    meta = runs.weights_metadata(run_dir / "model.safetensors")
    step = int(meta.get("step", 0))
    elapsed_s = 0.0
    try:
        state = json.loads((run_dir / "state.json").read_text())
        if int(state.get("step", -1)) == step:
            elapsed_s = float(state.get("elapsed_s", 0.0))
    except (OSError, ValueError):
        pass
    return {"step": step, "elapsed_s": elapsed_s}


def _preview_grid(run_dir: Path, model: nn.Module, ema: EMA | None, scheduler: NoiseScheduler,
                  config: RunConfig, device: torch.device, filename: str) -> Path:
    t = config.train
    steps = min(t.grid_steps, scheduler.num_timesteps) if t.grid_sampler == "ddim" else 0
    net = ema.model if ema is not None else model
    result = sample(net, scheduler, SampleConfig(sampler=t.grid_sampler, steps=steps, n=GRID_SAMPLES,
                                                 seed=GRID_SEED), pixel_range=t.pixel_range, device=device)
    return save_grid(run_dir / "samples" / filename, result.images, ncol=4)


# -- the background job ------------------------------------------------------------------------------
class TrainingJob:
    """One training run in a background thread, with start / stop / snapshot.

    The thread makes no UI calls; readers call `snapshot()` (a copy taken under a lock).
    """

    def __init__(self, run_dir: Path, *, resume: bool = False, images: ImageSet | None = None,
                 data_root: str | None = None):
        self.run_dir = Path(run_dir)
        self._resume, self._images, self._data_root = resume, images, data_root
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = Progress(run_name=self.run_dir.name, run_dir=str(self.run_dir))
        self._thread: threading.Thread | None = None
        self.traceback: str | None = None

    def _update(self, progress: Progress) -> None:
        copied = replace(progress, steps=list(progress.steps), losses=list(progress.losses))
        with self._lock:
            self._progress = copied

    def _main(self) -> None:
        try:
            train_run(self.run_dir, resume=self._resume, images=self._images, data_root=self._data_root,
                      on_progress=self._update, stop_event=self._stop)
        except BaseException as exc:  # noqa: BLE001 - the thread must never die silently
            self.traceback = traceback.format_exc()
            with self._lock:
                if self._progress.state != "failed":
                    self._progress = replace(self._progress, state="failed", error=str(exc))

    def start(self) -> "TrainingJob":
        if self._thread is not None:
            raise RuntimeError("this job was already started")
        self._thread = threading.Thread(target=self._main, name=f"train-{self.run_dir.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> Progress:
        with self._lock:
            p = self._progress
            return replace(p, steps=list(p.steps), losses=list(p.losses))

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
