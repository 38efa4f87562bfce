"""DPM-Solver++(2M), multistep second order in data prediction, ODE and SDE forms
(Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++", Algorithm 2 and section 5).

Notation: α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), λ_t = log(α_t/σ_t). A step goes from t to s < t with
h = λ_s − λ_t > 0; the previous step's timestep t_prev (> t) gives h_prev = λ_t − λ_{t_prev} and r = h_prev/h.

    D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_{t_prev}                           (second-order data estimate)
    ODE: x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D                            (Algorithm 2)
    SDE: x_s = (σ_s/σ_t)·e^{−h}·x_t + α_s·(1 − e^{−2h})·D + σ_s·sqrt(1 − e^{−2h})·z

Order rule (the original's min(order, steps + 1 − i); diffusers' lower_order_final):
- the first step has no x̂0_{t_prev}, so it takes D = x̂0_t (first order; the ODE form is then a DDIM step);
- the final step, into s = 0, is first order as well: σ_0 = 0 makes h infinite and r = 0, and with D = x̂0
  both forms give x_0 = x̂0_t exactly.
Every other step is second order, whatever the number of steps. This is diffusers'
DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 2,
final_sigmas_type "zero" and lower_order_final.
"""
from __future__ import annotations

import math

import torch

from .base import Noise, Solver, StepOutput, draw


class DPMSolverPP2M(Solver):
    """Keeps (t, x̂0) of the step before: the multistep history of the second-order update."""

    def __init__(self, scheduler, config, clip_range, sde: bool):
        super().__init__(scheduler, config, clip_range)
        self.sde = sde
        self.reset()

    def reset(self) -> None:
        self.previous: tuple[int, torch.Tensor] | None = None

    def step(self, eps, index, x_t, noise=None):
        t, s = self.timesteps[index], self.next_timestep(index)
        x0 = self.scheduler.pred_x0(x_t, t, eps)
        if self.clip_range is not None:
            x0 = x0.clamp(*self.clip_range)
        previous, self.previous = self.previous, (t, x0)
        if s == 0:
            return StepOutput(x0, x0)  # the final step, first order: x_0 = α_0·x̂0 = x̂0 (see the docstring)
        data = x0 if previous is None else self.data_estimate(t, s, x0, *previous)
        return StepOutput(self.update(t, s, x_t, data, noise), x0)

    def data_estimate(self, t: int, s: int, x0: torch.Tensor, t_prev: int, x0_prev: torch.Tensor) -> torch.Tensor:
        """D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_{t_prev}, r = h_prev / h."""
        lambdas = self.scheduler.lambdas
        r = float(lambdas[t] - lambdas[t_prev]) / float(lambdas[s] - lambdas[t])
        return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev

    def update(self, t: int, s: int, x_t: torch.Tensor, data: torch.Tensor, noise: Noise | None) -> torch.Tensor:
        """x_t -> x_s from the data estimate D, in the ODE or the SDE form."""
        sched = self.scheduler
        alpha_s, sigma_s, sigma_t = float(sched.signal[s]), float(sched.noise_level[s]), float(sched.noise_level[t])
        h = float(sched.lambdas[s] - sched.lambdas[t])
        if not self.sde:
            return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * data
        # expm1 keeps 1 − e^{−2h} exact for the small h of many-step runs
        return ((sigma_s / sigma_t) * math.exp(-h) * x_t + alpha_s * -math.expm1(-2 * h) * data
                + sigma_s * math.sqrt(-math.expm1(-2 * h)) * draw(noise, x_t))
