"""The scheduler against closed forms: schedules, forward marginals, the book's DDPM step, DDIM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.config import ConfigError, RunConfig, ScheduleConfig
from core.config import PRESETS
from tests.conftest import as_format
from core.diffusion.schedule import NoiseScheduler, cosine_beta_schedule
from core.diffusion.solvers import ddim_step, ddpm_step, from_generator
from core.diffusion.spacing import logsnr_grid, sampling_timesteps

# A tiny run's config.json as format 1 wrote it: no scale_to_timesteps field.
PRESETS_TINY_FORMAT_1 = as_format(PRESETS["tiny"].to_dict(), 1)
# Fields that came after format 1 (the T-scaled schedule, step 10's labels, the training objective) are
# not in such a file.
for _section, _later in (("schedule", ("scale_to_timesteps",)), ("model", ("num_classes",)),
                         ("train", ("label_dropout", "label_dropout_mode", "prediction", "min_snr_gamma"))):
    PRESETS_TINY_FORMAT_1[_section] = {k: v for k, v in PRESETS_TINY_FORMAT_1[_section].items() if k not in _later}


def test_linear_schedule_is_the_books():
    s = NoiseScheduler(ScheduleConfig(timesteps=1000))
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), indexed t - 1
    assert s.alpha_bars[0].item() == pytest.approx(1 - 1e-4)
    t = 500
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(t))
    assert s.alpha_bars[t - 1].item() == pytest.approx(expected, rel=1e-9)


def test_T_1000_is_exactly_the_books_linspace():
    """Scaling by 1000/T leaves T = 1000 untouched, bit for bit."""
    book = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.equal(NoiseScheduler(ScheduleConfig(timesteps=1000)).betas, book)


@pytest.mark.parametrize("T", [20, 50, 100, 1000])
def test_linear_schedule_reaches_noise_for_any_T(T):
    s = NoiseScheduler(ScheduleConfig(timesteps=T))
    assert s.alpha_bars[-1].item() < 1e-3
    assert s.betas.max().item() <= 0.999 and bool((s.betas > 0).all())
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / T)


def test_unscaled_schedule_is_kept_for_old_runs():
    """Format-1 run folders trained on betas 1e-4..0.02 whatever T: they keep that schedule."""
    config = RunConfig.from_dict(PRESETS_TINY_FORMAT_1)
    assert config.schedule.scale_to_timesteps is False
    s = NoiseScheduler(config.schedule)
    assert s.betas[-1].item() == pytest.approx(0.02) and s.alpha_bars[-1].item() > 0.5  # ᾱ_T = 0.82 at T = 20


def test_cosine_schedule_matches_its_closed_form():
    T, s = 1000, 0.008
    sched = NoiseScheduler(ScheduleConfig(timesteps=T, schedule="cosine"))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert sched.alpha_bars[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-6)
    assert cosine_beta_schedule(T).max() <= 0.999


def test_add_noise_is_equation_four():
    s = NoiseScheduler(ScheduleConfig(timesteps=50))
    x0, noise = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    t = torch.tensor([1, 10, 25, 50])
    x_t = s.add_noise(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = s.alpha_bars[ti - 1].item()
        assert torch.allclose(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], atol=1e-5)


def test_forward_marginal_statistics():
    """x_t of a constant image has mean sqrt(ab)·x0 and variance 1 − ab."""
    s = NoiseScheduler(ScheduleConfig(timesteps=100))
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 60)
    x_t = s.add_noise(x0, t, torch.randn_like(x0))
    ab = s.alpha_bars[59].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_timesteps_outside_one_to_T_are_refused():
    s = NoiseScheduler(ScheduleConfig(timesteps=10))
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="outside 1..T"):
        s.add_noise(x, torch.tensor([0]), x)
    with pytest.raises(ConfigError, match="outside 1..T"):
        ddpm_step(s, x, 11, x)


def test_ddpm_step_is_the_books_denoise():
    s = NoiseScheduler(ScheduleConfig(timesteps=30))
    x_t, eps = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    t = 12
    a, ab, ab_prev = (s.alphas[t - 1].item(), s.alpha_bars[t - 1].item(), s.alpha_bars[t - 2].item())
    mu = (x_t - (1 - a) / math.sqrt(1 - ab) * eps) / math.sqrt(a)
    std = math.sqrt((1 - a) * (1 - ab_prev) / (1 - ab))
    gen = torch.Generator().manual_seed(3)
    out = ddpm_step(s, eps, t, x_t, noise=from_generator(gen, x_t))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.prev_sample, mu + std * noise, atol=1e-5)
    assert torch.allclose(out.pred_original_sample, (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab), atol=1e-5)


def test_ddpm_last_step_adds_no_noise():
    s = NoiseScheduler(ScheduleConfig(timesteps=30))
    x_t, eps = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    a = s.alphas[0].item()
    mu = (x_t - (1 - a) / math.sqrt(1 - s.alpha_bars[0].item()) * eps) / math.sqrt(a)
    out1 = ddpm_step(s, eps, 1, x_t, noise=from_generator(torch.Generator().manual_seed(1), x_t))
    out2 = ddpm_step(s, eps, 1, x_t, noise=from_generator(torch.Generator().manual_seed(2), x_t))
    assert torch.allclose(out1.prev_sample, mu, atol=1e-5) and torch.equal(out1.prev_sample, out2.prev_sample)


def test_pred_x0_inverts_add_noise_with_the_true_noise():
    s = NoiseScheduler(ScheduleConfig(timesteps=1000))
    x0, noise = torch.rand(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    t = torch.tensor([5, 400, 990])
    x_t = s.add_noise(x0, t, noise)
    assert torch.allclose(s.pred_x0(x_t, t, noise), x0, atol=1e-3)


def test_ddim_with_true_noise_lands_on_x0_and_follows_the_marginal():
    """Deterministic DDIM (η=0) with the exact ε maps x_t to sqrt(ab_prev)·x0 + sqrt(1−ab_prev)·ε."""
    s = NoiseScheduler(ScheduleConfig(timesteps=100))
    x0, noise = torch.rand(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    x_t = s.add_noise(x0, torch.tensor([80, 80]), noise)
    out = ddim_step(s, noise, 80, 40, x_t, eta=0.0)
    ab_prev = s.alpha_bars[39].item()
    assert torch.allclose(out.prev_sample, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * noise, atol=1e-4)
    final = ddim_step(s, noise, 1, 0, s.add_noise(x0, torch.tensor([1, 1]), noise))
    assert torch.allclose(final.prev_sample, x0, atol=1e-4)


def test_ddim_eta_one_has_the_ddpm_posterior_variance():
    """With η = 1 and consecutive steps, σ_t equals the DDPM posterior std."""
    s = NoiseScheduler(ScheduleConfig(timesteps=50))
    x_t, eps = torch.zeros(20000, 1, 1, 1), torch.zeros(20000, 1, 1, 1)
    out = ddim_step(s, eps, 30, 29, x_t, eta=1.0, noise=from_generator(torch.Generator().manual_seed(0), x_t))
    a, ab, ab_prev = s.alphas[29].item(), s.alpha_bars[29].item(), s.alpha_bars[28].item()
    ddpm_std = math.sqrt((1 - a) * (1 - ab_prev) / (1 - ab))
    assert out.prev_sample.std().item() == pytest.approx(ddpm_std, rel=0.03)


@pytest.mark.parametrize("T", [10, 20, 50, 100, 1000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampling_timesteps_fall_strictly_within_one_to_T_for_every_step_count(schedule, T):
    """A property of every schedule, T and step count: N distinct timesteps, starting at T, strictly
    decreasing, all in [1, T]. Before the fix log-SNR spacing gave [1000, 1002, 1001, ...] for cosine
    T = 1000 at 20 steps and [20, 24, 23, ...] for linear T = 20."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=T, schedule=schedule))
    for spacing in ("uniform", "logsnr"):
        for steps in range(1, T + 1):
            ts = sampling_timesteps(scheduler, steps, spacing)
            assert len(ts) == steps and ts[0] == T and ts[-1] >= 1, (spacing, steps, ts)
            assert all(a > b for a, b in zip(ts, ts[1:])), (spacing, steps, ts)
    assert sampling_timesteps(scheduler, T, "logsnr") == list(range(T, 0, -1))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_spacing_is_even_in_lambda_up_to_rounding(schedule):
    """The continuous grid lies at even λ between λ_T and λ_1, and each timestep is its rounding unless
    that would repeat the one before. Cosine's λ_t falls steeply near T (and by 3.4 over its last interval,
    where β_T is capped), so at 20 steps its first 8 grid points all round to 999 or 1000 and the rule
    spreads them down by one each: log-SNR spacing spends those steps at the noisy end by design."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    lambdas = scheduler.lambdas[1:].numpy()  # λ_1 .. λ_T
    continuous = logsnr_grid(scheduler, 20)
    at_grid = np.interp(continuous, np.arange(1, 1001), lambdas)
    assert np.allclose(at_grid, np.linspace(lambdas[-1], lambdas[0], 21)[:-1], atol=1e-9)
    ts = sampling_timesteps(scheduler, 20, "logsnr")
    rounded = [int(round(float(c))) for c in continuous]
    free = [i for i in range(1, 20) if rounded[i] < ts[i - 1]]
    assert len(free) >= 10 and all(ts[i] == rounded[i] for i in free), (ts, rounded)
    assert all(ts[i] == ts[i - 1] - 1 for i in range(1, 20) if i not in free)


def test_uniform_spacing_is_trailing_and_logsnr_is_denser_at_small_t():
    s = NoiseScheduler(ScheduleConfig(timesteps=1000))
    assert sampling_timesteps(s, 10) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    logsnr = sampling_timesteps(s, 10, "logsnr")
    assert logsnr[-1] < 10 and logsnr[-3] < 100  # more steps at small t, where the image forms
    gaps = np.diff(s.lambdas[torch.tensor(logsnr)].numpy())
    assert np.allclose(gaps[:-1], gaps[0], rtol=0.25)  # even in λ, up to rounding to whole t


@pytest.mark.parametrize("steps", [0, 1001])
def test_sampling_timesteps_refuse_bad_counts(steps):
    with pytest.raises(ConfigError, match="between 1 and T"):
        sampling_timesteps(NoiseScheduler(ScheduleConfig(timesteps=1000)), steps)
