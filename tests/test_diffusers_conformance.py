"""The samplers against diffusers' schedulers: same tables, same x_T, same timesteps, same network.

diffusers counts timesteps from 0 (its t_d = our t − 1) and is given our betas (`trained_betas`), so both
walk the same ᾱ table. The network is the exact predictor for Gaussian data (tests/test_solvers.py)
with a fixed nonlinear term added to its x̂0, so x̂0 changes between steps the way a real network's does; for
v-prediction its ε̂ is written as v̂ = sqrt(ᾱ)·ε̂ − sqrt(1 − ᾱ)·x̂0. Agreement is asked to 1e-4 in model
range. Deterministic samplers are compared over whole runs from the same x_T; the stochastic ones
(DDPM, DDIM η > 0, the SDE form of DPM-Solver++(2M)) step by step with the same noise.

Both sides run in float64 on float64 tables. In float32 the first step of the cosine schedule is
ill-conditioned for any implementation: ᾱ_T = 2.4e-9, so x̂0 = (x_T − σ_T·ε̂)/α_T magnifies the last bit
of x_T or σ_T by 1/α_T = 2e4, and the two sides would differ by 1e-3 through rounding alone.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from core.config import SampleConfig, ScheduleConfig  # noqa: E402
from core.diffusion.schedule import NoiseScheduler  # noqa: E402
from core.diffusion.solvers import ddim_step, ddpm_step, from_generator, make_solver  # noqa: E402
from core.diffusion.spacing import sampling_timesteps  # noqa: E402

from test_solvers import gaussian_denoiser  # noqa: E402

# diffusers 0.42 converts its ᾱ table through numpy with a copy keyword that torch tensors warn about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-4
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def network(scheduler: NoiseScheduler, prediction: str):
    """A fixed denoiser (x_t, t) -> ε̂ or v̂ whose x̂0 is the Gaussian oracle's plus 0.1·sin(x_t): not linear
    in x_t, and x̂0 stays in model range at every t (a perturbation of ε̂ would be magnified by σ_t/α_t)."""
    oracle = gaussian_denoiser(scheduler)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = scheduler.alpha_bars[t - 1].view(-1, 1, 1, 1)
        x64 = x.double()
        x0 = (x64 - (1 - ab).sqrt() * oracle(x, t).double()) / ab.sqrt() + 0.1 * torch.sin(x64)
        eps = (x64 - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.to(x.dtype)
    return model


def reference_scheduler(cls, scheduler: NoiseScheduler, prediction: str, steps: int | None = None,
                        timesteps: list[int] | None = None, **options):
    """A diffusers scheduler on our tables in float64 (diffusers builds them in float32), set to our
    timesteps: `steps` for its own trailing spacing, or `timesteps` (ours, 1..T) given explicitly."""
    reference = cls(num_train_timesteps=scheduler.num_timesteps, trained_betas=scheduler.betas.numpy(),
                    prediction_type=DIFFUSERS_PREDICTION[prediction], **options)
    reference.alphas_cumprod = scheduler.alpha_bars.clone()
    if timesteps is not None:
        reference.set_timesteps(timesteps=[t - 1 for t in timesteps])
    else:
        reference.set_timesteps(steps)
    if hasattr(reference, "sigmas"):  # DPM-Solver: σ = sqrt((1 − ᾱ)/ᾱ) at its timesteps, then 0 (final_sigmas_type)
        ab = scheduler.alpha_bars[reference.timesteps.long()]
        reference.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    return reference


def x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(scheduler, prediction, config, x):
    """Our solver's whole run from x, on the same loop as core.diffusion.sampling (ε̂ from the output,
    one solver step per timestep), in float64."""
    model, solver = network(scheduler, prediction), make_solver(scheduler, config, pixel_range="symmetric")
    for index, t in enumerate(solver.timesteps):
        t_batch = torch.full((len(x),), t, dtype=torch.long)
        x = solver.step(scheduler.pred_eps(model(x, t_batch), x, t_batch, prediction), index, x).prev_sample
    return x


def theirs(reference, scheduler, prediction, x, **step_options):
    model = network(scheduler, prediction)
    for t_d in reference.timesteps:
        t = torch.full((len(x),), int(t_d) + 1, dtype=torch.long)
        x = reference.step(model(x, t), t_d, x, **step_options).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_ddim_matches_diffusers(steps, schedule, prediction):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    config = SampleConfig(sampler="ddim", steps=steps, clip="off")
    reference = reference_scheduler(DDIMScheduler, scheduler, prediction, steps, clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing="trailing")
    assert [int(t) + 1 for t in reference.timesteps] == sampling_timesteps(scheduler, steps)
    torch.testing.assert_close(ours(scheduler, prediction, config, x_T()),
                               theirs(reference, scheduler, prediction, x_T()), atol=TOL, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 14, 20, 50])
def test_dpm_solver_pp_2m_matches_diffusers(steps, schedule, prediction):
    """Includes 5, 10 and 14 steps, where diffusers' lower_order_final applies: only the final step is
    first order (the step into the last timestep stays second order)."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    config = SampleConfig(sampler="dpmpp2m", steps=steps, clip="off")
    reference = reference_scheduler(DPMSolverMultistepScheduler, scheduler, prediction, steps,
                                    algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
                                    final_sigmas_type="zero", lower_order_final=True)
    assert [int(t) + 1 for t in reference.timesteps] == sampling_timesteps(scheduler, steps)
    torch.testing.assert_close(ours(scheduler, prediction, config, x_T(2)),
                               theirs(reference, scheduler, prediction, x_T(2)), atol=TOL, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_pp_2m_matches_diffusers_on_logsnr_timesteps(schedule):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    config = SampleConfig(sampler="dpmpp2m", steps=10, clip="off", spacing="logsnr")
    reference = reference_scheduler(DPMSolverMultistepScheduler, scheduler, "eps",
                                    timesteps=sampling_timesteps(scheduler, 10, "logsnr"),
                                    algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                    lower_order_final=True)
    torch.testing.assert_close(ours(scheduler, "eps", config, x_T(3)),
                               theirs(reference, scheduler, "eps", x_T(3)), atol=TOL, rtol=0)


def step_by_step(solver, reference, scheduler, prediction, step_options) -> None:
    """Both samplers from the same x at each step, the same model output and the same noise."""
    model = network(scheduler, prediction)
    x_ours = x_theirs = x_T(5)
    for index, (t, t_d) in enumerate(zip(solver.timesteps, reference.timesteps)):
        assert t == int(t_d) + 1
        z = torch.randn(x_ours.shape, generator=torch.Generator().manual_seed(100 + index), dtype=torch.float64)
        t_batch = torch.full((3,), t, dtype=torch.long)
        out = solver.step(scheduler.pred_eps(model(x_ours, t_batch), x_ours, t_batch, prediction), index, x_ours,
                          lambda: z)
        x_theirs = reference.step(model(x_theirs, t_batch), t_d, x_theirs, **step_options(z, index)).prev_sample
        torch.testing.assert_close(out.prev_sample, x_theirs, atol=TOL, rtol=0, msg=f"step {index}, t = {t}")
        x_ours = out.prev_sample


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_pp_2m_sde_matches_diffusers_step_by_step(steps, schedule, prediction):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    solver = make_solver(scheduler, SampleConfig(sampler="dpmpp2m-sde", steps=steps, clip="off"), pixel_range="symmetric")
    reference = reference_scheduler(DPMSolverMultistepScheduler, scheduler, prediction, steps,
                                    algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="trailing",
                                    final_sigmas_type="zero", lower_order_final=True)
    step_by_step(solver, reference, scheduler, prediction, lambda z, index: {"variance_noise": z})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_matches_diffusers_step_by_step(schedule, prediction):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    solver = make_solver(scheduler, SampleConfig(sampler="ddim", steps=20, eta=0.7, clip="off"), pixel_range="symmetric")
    reference = reference_scheduler(DDIMScheduler, scheduler, prediction, 20, clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing="trailing")
    step_by_step(solver, reference, scheduler, prediction, lambda z, index: {"eta": 0.7, "variance_noise": z})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_matches_diffusers_step_by_step(schedule, prediction):
    """diffusers' DDPMScheduler draws its noise from the generator it is given; ours gets the same
    seeded generator, so both add the same z at every t > 1 (and none at t = 1)."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=50, schedule=schedule))
    reference = reference_scheduler(DDPMScheduler, scheduler, prediction, 50, variance_type="fixed_small",
                                    clip_sample=False)
    model = network(scheduler, prediction)
    x_ours = x_theirs = x_T(5)
    for t_d in reference.timesteps:
        t = int(t_d) + 1
        t_batch = torch.full((3,), t, dtype=torch.long)
        eps = scheduler.pred_eps(model(x_ours, t_batch), x_ours, t_batch, prediction)
        x_ours = ddpm_step(scheduler, eps, t, x_ours,
                           noise=from_generator(torch.Generator().manual_seed(t), x_ours)).prev_sample
        x_theirs = reference.step(model(x_theirs, t_batch), t_d, x_theirs,
                                  generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=TOL, rtol=0, msg=f"t = {t}")


def test_ddim_step_function_matches_diffusers_into_t_zero():
    """The last DDIM step lands on x̂0 exactly (ᾱ_0 = 1, diffusers' set_alpha_to_one)."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000))
    reference = reference_scheduler(DDIMScheduler, scheduler, "eps", 10, clip_sample=False, set_alpha_to_one=True,
                                    timestep_spacing="trailing")
    x, eps = x_T(6), x_T(7)
    torch.testing.assert_close(ddim_step(scheduler, eps, 100, 0, x).prev_sample,
                               reference.step(eps, 99, x).prev_sample, atol=TOL, rtol=0)
