"""The samplers, one file each: DDPM (ddpm.py), DDIM (ddim.py), DPM-Solver++(2M) ODE and SDE
(dpm_solver_pp.py); what they share is in base.py. `make_solver` picks one for a SampleConfig."""
from __future__ import annotations

from ...config import ConfigError, SampleConfig
from ...data.datasets import data_range
from ..schedule import NoiseScheduler
from .base import Noise, Solver, StepOutput, from_generator
from .ddim import DDIM, ddim_step
from .ddpm import DDPM, ddpm_step
from .dpm_solver_pp import DPMSolverPP2M

__all__ = ["DDIM", "DDPM", "DPMSolverPP2M", "Noise", "Solver", "StepOutput", "ddim_step", "ddpm_step",
           "from_generator", "make_solver"]


def make_solver(scheduler: NoiseScheduler, config: SampleConfig, *, pixel_range: str,
                clip_default: bool = False) -> Solver:
    """The solver for `config.sampler`; `clip_default` is the run's own DDPM clipping default."""
    clip_range = data_range(pixel_range) if config.resolved_clip(clip_default) else None
    if config.sampler == "ddpm":
        return DDPM(scheduler, config, clip_range)
    if config.sampler == "ddim":
        return DDIM(scheduler, config, clip_range)
    if config.sampler in ("dpmpp2m", "dpmpp2m-sde"):
        return DPMSolverPP2M(scheduler, config, clip_range, sde=config.sampler.endswith("sde"))
    raise ConfigError(f"sampler = {config.sampler!r} is not allowed")  # SampleConfig refuses it first
