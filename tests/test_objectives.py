"""The training objective's two ablations (issue 10): the v-prediction target (Salimans & Ho 2022) and
Min-SNR-γ loss weights (Hang et al. 2023). The book's objective (ε, plain MSE) stays the default and
stays bit for bit what it was; every sampler handles a v-prediction network through one conversion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.cli import main as cli
from core.store import runs
from core.config import FORMAT_VERSION, PRESETS, ConfigError, RunConfig, ScheduleConfig, SampleConfig, \
    TrainConfig, override, run_label
from core.evaluation.diagnostics import loss_by_timestep
from tests.conftest import as_format
from core.models import build_model
from core.diffusion.sampling import reverse_process, sample
from core.diffusion.schedule import NoiseScheduler
from core.train.training import Trainer, min_snr_weight, train_run
from tests.conftest import make_tiny_images, tiny_config
from tests.test_solvers import MU, S, gaussian_denoiser


# -- (a) the conversion --------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_converts_back_to_the_noise_it_was_made_from(schedule):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=1000, schedule=schedule))
    gen = torch.Generator().manual_seed(0)
    x_0 = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
    noise = torch.randn(8, 1, 28, 28, generator=gen)
    t = torch.tensor([1, 2, 10, 100, 500, 900, 999, 1000])
    x_t = scheduler.add_noise(x_0, t, noise)
    v = scheduler.velocity(x_0, t, noise)
    alpha_bar = scheduler.alpha_bars[t - 1].float().view(-1, 1, 1, 1)
    assert torch.allclose(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_0, atol=1e-6)
    assert torch.allclose(scheduler.pred_eps(v, x_t, t, "v"), noise, atol=1e-6)
    assert scheduler.pred_eps(noise, x_t, t, "eps") is noise  # ε-prediction: the output itself, untouched
    # an int timestep (what the steppers hold) converts the same way
    assert torch.allclose(scheduler.pred_eps(v[4:5], x_t[4:5], 500, "v"), noise[4:5], atol=1e-6)
    with pytest.raises(ConfigError, match="prediction = 'x0' is not allowed"):
        scheduler.pred_eps(v, x_t, t, "x0")


# -- (b) every sampler against the closed-form oracle --------------------------------------------------
def gaussian_v_denoiser(scheduler: NoiseScheduler, mu: float = MU, s: float = S):
    """The exact v-prediction for x_0 ~ N(mu, s²I), from the exact ε̂: v = α_t·ε̂ − σ_t·x̂0 with
    x̂0 = (x_t − σ_t·ε̂)/α_t, i.e. v = (ε̂ − σ_t·x_t)/α_t."""
    eps_of = gaussian_denoiser(scheduler, mu, s)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = scheduler.alpha_bars[t - 1].view(-1, 1, 1, 1)
        eps = eps_of(x.double(), t)
        return ((eps - (1 - ab).sqrt() * x.double()) / ab.sqrt()).to(x.dtype)
    return v


@pytest.mark.parametrize("clip", ["off", "on"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde"])
def test_every_sampler_gives_the_same_images_from_the_v_oracle(sampler, clip):
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=100))
    config = SampleConfig(sampler=sampler, steps=0 if sampler == "ddpm" else 10, n=4, seed=7, clip=clip,
                          eta=0.5 if sampler == "ddim" else 0.0)
    by_eps = list(reverse_process(gaussian_denoiser(scheduler), scheduler, config, pixel_range="symmetric"))
    by_v = list(reverse_process(gaussian_v_denoiser(scheduler), scheduler, config, pixel_range="symmetric",
                                prediction="v"))
    assert len(by_eps) == len(by_v)
    for a, b in zip(by_eps, by_v):
        assert torch.allclose(a.x_next, b.x_next, atol=1e-5), (sampler, a.t)
        # x̂0 = (x_t − σ_t·ε̂)/α_t magnifies float32 rounding of ε̂ by σ_t/α_t (≈ 150 at t = T here)
        assert torch.allclose(a.pred_x0, b.pred_x0, atol=1e-4), (sampler, a.t)
    assert torch.allclose(by_eps[-1].x_next, by_v[-1].x_next, atol=1e-5)
    # and the wrong conversion is not silently the same
    wrong = list(reverse_process(gaussian_v_denoiser(scheduler), scheduler, config, pixel_range="symmetric"))
    assert not torch.allclose(wrong[-1].x_next, by_eps[-1].x_next, atol=1e-2)


def test_guided_v_equals_guided_eps():
    """Guidance mixes outputs with weights summing to 1 and the conversion is affine in the output:
    guiding v̂ and converting equals converting and guiding ε̂."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=50))

    def conditional(denoiser_for):
        def model(x, t, labels):
            mu = torch.where(labels == 0, -0.4, 0.3).double()   # a different Gaussian per class
            return torch.cat([denoiser_for(scheduler, float(m))(x[i:i + 1], t[i:i + 1])
                              for i, m in enumerate(mu.tolist())])
        return model

    config = SampleConfig(sampler="dpmpp2m", steps=8, n=4, seed=2, clip="off")
    labels = torch.tensor([0, 1, 0, 1])
    by_eps = sample(conditional(gaussian_denoiser), scheduler, config, labels=labels, guidance=3.0,
                    pixel_range="symmetric")
    by_v = sample(conditional(gaussian_v_denoiser), scheduler, config, labels=labels, guidance=3.0,
                  pixel_range="symmetric", prediction="v")
    assert np.abs(by_eps.images.astype(int) - by_v.images.astype(int)).max() <= 1


def test_reverse_process_refuses_an_unknown_target():
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=10))
    with pytest.raises(ConfigError, match="prediction = 'x0' is not allowed: choose one of eps, v"):
        next(reverse_process(gaussian_denoiser(scheduler), scheduler, SampleConfig(n=1), prediction="x0"))


# -- (c) the loss ----------------------------------------------------------------------------------------
def test_min_snr_weights_match_the_paper():
    snr = torch.tensor([1e-4, 0.5, 1.0, 4.9, 5.0, 5.1, 100.0, 1e4])
    gamma = 5.0
    eps_w = min_snr_weight(snr, gamma, "eps")
    v_w = min_snr_weight(snr, gamma, "v")
    assert torch.allclose(eps_w, torch.minimum(snr, torch.tensor(gamma)) / snr)
    assert torch.allclose(v_w, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert bool((eps_w <= 1).all()) and bool((v_w <= 1).all())
    assert torch.equal(eps_w[:4], torch.ones(4))       # SNR ≤ γ: ε-prediction keeps its weight
    assert eps_w[-1].item() == pytest.approx(gamma / 1e4)  # the low-noise end is turned down
    assert min_snr_weight(torch.zeros(1), gamma, "eps").item() == 1.0  # no 0/0 where SNR underflows


def _fixed_batch(config: RunConfig):
    gen = torch.Generator().manual_seed(3)
    x_0 = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
    t = torch.randint(1, config.schedule.timesteps + 1, (8,), generator=gen)
    noise = torch.randn(8, 1, 28, 28, generator=gen)
    return x_0, t, noise


def _noised(trainer: Trainer, x_0, t, noise):
    alpha_bar = trainer.alpha_bars[t - 1].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise, alpha_bar


def test_the_books_loss_is_bit_identical_by_default():
    config = tiny_config()
    assert (config.train.prediction, config.train.min_snr_gamma) == ("eps", 0.0)
    trainer = Trainer(config, torch.device("cpu"))
    x_0, t, noise = _fixed_batch(config)
    x_t, _ = _noised(trainer, x_0, t, noise)
    with torch.no_grad():
        expected = F.mse_loss(trainer.model(x_t, t).float(), noise)  # the formula train_step always had
    loss = trainer.train_step(x_0, timesteps=t, noise=noise)
    assert torch.equal(loss.detach(), expected)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_objectives_compute_the_formula(prediction):
    gamma = 5.0
    plain = Trainer(tiny_config(prediction=prediction), torch.device("cpu"))
    weighted = Trainer(tiny_config(prediction=prediction, min_snr_gamma=gamma), torch.device("cpu"))
    x_0, t, noise = _fixed_batch(plain.config)
    x_t, alpha_bar = _noised(plain, x_0, t, noise)
    with torch.no_grad():
        output = plain.model(x_t, t).float()  # same seed: both trainers hold the same initial weights
        assert torch.equal(output, weighted.model(x_t, t).float())
    target = noise if prediction == "eps" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_0
    snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    weight = torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction == "eps" else snr + 1)
    per_sample = ((output - target) ** 2).mean(dim=(1, 2, 3))
    assert plain.train_step(x_0, timesteps=t, noise=noise).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert weighted.train_step(x_0, timesteps=t, noise=noise).item() == \
        pytest.approx((weight * per_sample).mean().item(), rel=1e-6)


# -- (d) a tiny run of each objective trains and samples through the right conversion -----------------
@pytest.fixture(scope="module")
def images():
    return make_tiny_images()


@pytest.fixture(scope="module")
def objective_run(tmp_path_factory, images):
    """The tiny preset trained 40 steps with an objective, once per module and objective."""
    trained = {}

    def run_of(prediction: str, gamma: float):
        if (prediction, gamma) not in trained:
            config = override(PRESETS["tiny"], max_steps=40, epochs=0, lr=3e-3, log_every=10,
                              sample_every_epochs=0, prediction=prediction, min_snr_gamma=gamma)
            run = runs.create_run(tmp_path_factory.mktemp("objectives"), f"{prediction}-{gamma:g}", config)
            train_run(run, images=images)
            trained[(prediction, gamma)] = run
        return trained[(prediction, gamma)]
    return run_of


@pytest.mark.parametrize("prediction, gamma", [("v", 0.0), ("eps", 5.0), ("v", 5.0)])
def test_each_objective_trains(objective_run, prediction, gamma):
    run = objective_run(prediction, gamma)
    losses = [r["loss"] for r in runs.read_metrics(run)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], losses
    saved = runs.load_config(run).train
    assert (saved.prediction, saved.min_snr_gamma) == (prediction, gamma)
    assert (run / "samples" / "final.png").is_file()


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_a_v_run_samples_and_denoises_through_the_conversion(objective_run, images, gamma):
    loaded = runs.load_model(objective_run("v", gamma))
    scheduler = NoiseScheduler(loaded.config.schedule)
    config = SampleConfig(sampler="dpmpp2m-sde", steps=20, n=16, seed=1)
    trained = sample(loaded.model, scheduler, config, pixel_range="symmetric",
                     prediction=loaded.config.train.prediction).images.astype(float)
    torch.manual_seed(0)
    untrained = sample(build_model(loaded.config.model), scheduler, config, pixel_range="symmetric",
                       prediction="v").images.astype(float)
    data = images.images.float().numpy()
    # the data: bright rectangles on black (mean pixel ≈ 13); noise decodes to mid grey (≈ 125)
    assert abs(trained.mean() - data.mean()) < 20 < abs(untrained.mean() - data.mean())
    # ε̂ and x̂0 on a noised batch: the v → ε̂ conversion is what makes them right
    right = loss_by_timestep(loaded.model, scheduler, images.images[:64], pixel_range="symmetric", buckets=4,
                             prediction="v")
    wrong = loss_by_timestep(loaded.model, scheduler, images.images[:64], pixel_range="symmetric", buckets=4)
    assert sum(b.loss for b in right) < 0.5 * sum(b.loss for b in wrong)
    if gamma == 0:
        # (Min-SNR's v form weights the noisiest steps' x̂0 error by about SNR_t ≈ 0, as ε-prediction
        # does, so after 40 steps its x̂0 there is still poor either way; plain v weights it by about 1.)
        assert sum(b.x0_loss for b in right) < 0.5 * sum(b.x0_loss for b in wrong)


# -- (e) config ----------------------------------------------------------------------------------------
def test_objective_fields_round_trip_and_older_formats():
    config = override(PRESETS["tiny"], prediction="v", min_snr_gamma=5.0)
    assert RunConfig.from_json(config.to_json()) == config
    assert FORMAT_VERSION == 5 and config.to_dict()["format_version"] == 5
    assert run_label(config) == "ImprovedUNet + AdamW (v-pred, Min-SNR-5)"
    assert run_label(PRESETS["tiny"]) == "ImprovedUNet + AdamW"
    format_3 = as_format(PRESETS["improved-cfg"].to_dict(), 3)
    del format_3["train"]["prediction"], format_3["train"]["min_snr_gamma"]
    old = RunConfig.from_dict(format_3)
    assert (old.train.prediction, old.train.min_snr_gamma) == ("eps", 0.0)
    assert old.model.num_classes == 10
    edited = {**format_3, "format_version": 3, "train": {**format_3["train"], "prediction": "v"}}
    with pytest.raises(ConfigError, match="format 3 does not know: prediction"):
        RunConfig.from_dict(edited)


@pytest.mark.parametrize("field, value, rule", [
    ("prediction", "x0", "choose one of eps, v"),
    ("prediction", "", "choose one of eps, v"),
    ("min_snr_gamma", -1, "it must be at least 0"),
    ("min_snr_gamma", 5000.0, "it must be at most 1000"),
    ("min_snr_gamma", float("nan"), "finite number"),
    ("min_snr_gamma", True, "finite number"),
])
def test_bad_objective_values_name_field_value_and_rule(field, value, rule):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} = {value!r} is not allowed") and rule in message


# -- (f) the CLI -----------------------------------------------------------------------------------------
def test_cli_flags_reach_config_json(tmp_path, images, monkeypatch, capsys):
    from core.cli import train as train_cli
    monkeypatch.setattr(train_cli, "load_training_images", lambda *args, **kwargs: images)
    runs_dir = tmp_path / "runs"
    code = cli.main(["train", "--preset", "tiny", "--max-steps", "2", "--prediction", "v", "--min-snr-gamma", "5",
                     "--runs-dir", str(runs_dir), "--name", "obj", "--quiet"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((runs_dir / "obj" / "config.json").read_text())
    assert saved["format_version"] == 5
    assert saved["train"]["prediction"] == "v" and saved["train"]["min_snr_gamma"] == 5.0
    capsys.readouterr()
    assert cli.main(["runs", "--runs-dir", str(runs_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["objective"] == "v-pred, Min-SNR-5"
    assert cli.main(["runs", "--runs-dir", str(runs_dir)]) == 0
    assert "(v-pred, Min-SNR-5)" in capsys.readouterr().out
    # the objective shapes what the weights mean: a resume cannot change it
    code = cli.main(["train", "--resume", "--name", "obj", "--prediction", "eps", "--runs-dir", str(runs_dir),
                     "--quiet"])
    assert code == 2 and "--prediction cannot change on --resume" in capsys.readouterr().err
    code = cli.main(["train", "--preset", "tiny", "--min-snr-gamma", "-1", "--runs-dir", str(runs_dir),
                     "--name", "bad", "--quiet"])
    assert code == 2 and "min_snr_gamma = -1.0 is not allowed" in capsys.readouterr().err
    assert not (runs_dir / "bad").exists()
