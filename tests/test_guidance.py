"""Step 10: conditional networks, label dropout, classifier-free guidance, and their CLI and eval.

Everything runs on tiny configs or closed-form toy models, in seconds on one thread.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from core.store import runs
from core.bench.runner import SMOKE, measure_guidance
from core.cli.main import main
from core.config import FORMAT_VERSION, PRESETS, ConfigError, ModelConfig, RunConfig, SampleConfig, TrainConfig
from tests.conftest import as_format
from core.data.datasets import CLASS_NAMES
from core.evaluation import classifier as clf
from core.evaluation.frechet import QualityEvaluator, frechet_distance_of_features
from core.diffusion.guidance import class_index, even_labels, guided, per_class_labels
from core.models import NO_LABEL, ImprovedUNet, UNet, build_model
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler
from core.config import ScheduleConfig
from core.train.training import Trainer, train_run
from tests.conftest import REPO, make_tiny_images, tiny_config
from tests.test_evaluation import tiny_split, write_idx


def conditional_config(**train_changes) -> RunConfig:
    config = tiny_config(**train_changes)
    return replace(config, model=replace(config.model, num_classes=10))


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, trained_runs):
    """A finished tiny conditional run (ImprovedUNet, null token, per-sample dropout), the module's copy of
    one trained once per session."""
    trained = trained_runs(conditional_config(label_dropout=0.2), "cond")
    return shutil.copytree(trained, tmp_path_factory.mktemp("runs") / "cond", symlinks=True)


# -- networks ------------------------------------------------------------------------------------------
def test_book_unet_is_step_10_when_conditional_and_step_9_otherwise():
    plain = UNet(base_channels=8)
    cond = UNet(base_channels=8, num_classes=10)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert cond.state_dict()["label_emb.weight"].shape == (10, 100)  # nn.Embedding(10, time_embed_dim)
    assert not any("label" in k for k in plain.state_dict())
    cond.eval()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 50, 500, 1000])
    with torch.no_grad():
        none = cond(x, t)                                         # the book's CFG: labels=None
        null = cond(x, t, torch.full((4,), NO_LABEL))             # per sample: the same
        labelled = cond(x, t, torch.tensor([0, 3, 7, 9]))
        mixed = cond(x, t, torch.tensor([0, NO_LABEL, 7, NO_LABEL]))
    assert torch.equal(none, null)
    assert not torch.allclose(none, labelled)
    assert torch.allclose(mixed[[0, 2]], labelled[[0, 2]], atol=1e-6) and torch.allclose(mixed[[1, 3]], none[[1, 3]], atol=1e-6)


def test_book_unet_adds_the_label_embedding_to_the_positional_encoding():
    """Step 10 writes `v = pos_encoding(t) + label_emb(labels)`: a label is a shift of the encoding."""
    model = UNet(base_channels=8, num_classes=10).eval()
    seen = []
    model.down1.mlp.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 20]), torch.tensor([4, 5])
    with torch.no_grad():
        model(x, t)
        model(x, t, y)
    assert torch.allclose(seen[1] - seen[0], model.label_emb.weight[y], atol=1e-6)


def test_improved_unet_has_a_learned_null_token():
    plain = ImprovedUNet(base_channels=8, channel_mults=(1, 2), attention=False)
    cond = ImprovedUNet(base_channels=8, channel_mults=(1, 2), attention=False, num_classes=10)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert cond.label_emb.weight.shape == (11, 32)  # 10 classes + the null token, time MLP width 4C
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    with torch.no_grad():
        for p in cond.parameters():  # the zero-initialised residual branches would hide the labels
            if not p.any():
                nn.init.normal_(p, std=0.1)
        assert torch.equal(cond(x, t), cond(x, t, torch.full((3,), NO_LABEL)))
        assert not torch.allclose(cond(x, t), cond(x, t, torch.tensor([1, 2, 3])))


def test_shipped_unconditional_runs_still_load_and_sample():
    for name in ("demo-book-unet-adam", "demo-improved-unet-adamw"):
        loaded = runs.load_model(REPO / "checkpoints" / name)
        assert loaded.config.model.num_classes == 0 and not hasattr(loaded.model, "label_emb")


# -- config --------------------------------------------------------------------------------------------
def test_old_formats_read_as_unconditional_and_new_fields_need_format_3():
    old = as_format(PRESETS["book"].to_dict(), 4)
    for section, name in (("model", "num_classes"), ("train", "label_dropout"), ("train", "label_dropout_mode"),
                          ("train", "prediction"), ("train", "min_snr_gamma")):  # format 4's too
        del old[section][name]
    for version in (1, 2):
        config = RunConfig.from_dict({**old, "format_version": version})
        assert config.model.num_classes == 0 and config.format_version == FORMAT_VERSION == 5
    with pytest.raises(ConfigError, match="format 2 does not know: num_classes"):
        RunConfig.from_dict(as_format(PRESETS["improved-cfg"].to_dict(), 2))
    with pytest.raises(ConfigError, match="misses the fields: num_classes"):
        RunConfig.from_dict({**old, "format_version": 3})
    assert RunConfig.from_json(PRESETS["improved-cfg"].to_json()) == PRESETS["improved-cfg"]


def test_presets_reproduce_step_10():
    cond, cfg, improved = PRESETS["book-cond"], PRESETS["book-cfg"], PRESETS["improved-cfg"]
    for preset in (cond, cfg):
        assert preset.model.name == "unet" and preset.model.num_classes == 10 and preset.model.base_channels == 64
        assert (preset.train.optimizer, preset.train.lr, preset.train.batch_size, preset.train.epochs) == ("adam", 1e-3, 128, 10)
    assert cond.train.label_dropout == 0
    assert (cfg.train.label_dropout, cfg.train.label_dropout_mode) == (0.1, "batch")
    assert improved.model.name == "improved_unet" and improved.train.label_dropout_mode == "sample"


@pytest.mark.parametrize("changes, message", [
    ({"label_dropout": 1.0}, "label_dropout = 1.0 is not allowed"),
    ({"label_dropout": -0.1}, "label_dropout = -0.1 is not allowed"),
    ({"label_dropout": math.nan}, "label_dropout = nan is not allowed"),
    ({"label_dropout_mode": "epoch"}, "label_dropout_mode = 'epoch' is not allowed"),
])
def test_bad_label_dropout_is_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)
    with pytest.raises(ConfigError, match="num_classes = 1 is not allowed"):
        ModelConfig(num_classes=1)


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_label_dropout_statistics(mode):
    trainer = Trainer(conditional_config(label_dropout=0.3, label_dropout_mode=mode), torch.device("cpu"))
    labels = torch.arange(64) % 10
    torch.manual_seed(0)
    dropped_shares = []
    for _ in range(400):
        out = trainer.drop_labels(labels)
        if mode == "batch":
            assert out is None or torch.equal(out, labels)  # all or nothing, as the book does
            dropped_shares.append(1.0 if out is None else 0.0)
        else:
            kept = out != NO_LABEL
            assert torch.equal(out[kept], labels[kept])
            dropped_shares.append(float((~kept).double().mean()))
    shares = torch.tensor(dropped_shares)
    assert abs(float(shares.mean()) - 0.3) < 0.05
    if mode == "sample":  # every batch mixes both tasks
        assert float(shares.min()) > 0 and float(shares.max()) < 1


def test_no_dropout_and_unconditional_runs_pass_labels_through():
    labels = torch.arange(8)
    assert torch.equal(Trainer(conditional_config(label_dropout=0.0), torch.device("cpu")).drop_labels(labels), labels)
    assert Trainer(tiny_config(), torch.device("cpu")).drop_labels(None) is None


def test_unconditional_train_step_ignores_labels_draw_for_draw():
    """The unconditional path stays the step-9 one: the same seed gives the same loss with or without labels."""
    x_0 = torch.rand(8, 1, 28, 28)
    losses = []
    for labels in (None, torch.arange(8)):
        trainer = Trainer(tiny_config(), torch.device("cpu"))
        torch.manual_seed(5)
        losses.append(float(trainer.train_step(x_0, labels=labels).detach()))
    assert losses[0] == losses[1]


def test_conditional_training_learns_the_label_embedding(cond_run):
    loaded = runs.load_model(cond_run, use_ema=False)
    fresh = build_model(loaded.config.model)
    assert loaded.config.format_version == FORMAT_VERSION and loaded.config.model.num_classes == 10
    assert not torch.equal(loaded.model.label_emb.weight, fresh.label_emb.weight)
    assert (cond_run / "samples" / "final.png").is_file()


# -- guidance ------------------------------------------------------------------------------------------
class CountingModel(nn.Module):
    """A conditional toy network whose output depends on x, t and the label; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls, self.batch_sizes = 0, []
        self.label_shift = nn.Parameter(torch.randn(11))

    def forward(self, x, t, labels=None):
        self.calls += 1
        self.batch_sizes.append(len(x))
        labels = torch.full((len(x),), NO_LABEL) if labels is None else labels
        shift = self.label_shift[torch.where(labels == NO_LABEL, 10, labels)]
        return torch.tanh(x * (1 + t[:, None, None, None] / 100)) + shift[:, None, None, None]


def test_guidance_one_is_the_conditional_pass_and_zero_the_unconditional():
    model, x, t, y = CountingModel(), torch.randn(5, 1, 28, 28), torch.full((5,), 7), torch.tensor([0, 1, 2, 3, 9])
    assert torch.equal(guided(model, y, 1.0)(x, t), model(x, t, y))
    assert torch.equal(guided(model, y, 0.0)(x, t), model(x, t, None))
    model.calls = 0
    guided(model, y, 1.0)(x, t)
    guided(model, y, 0.0)(x, t)
    assert model.calls == 2  # one pass each: no wasted half


@pytest.mark.parametrize("scale", [0.5, 3.0, 7.0])
def test_guidance_is_one_batched_pass_equal_to_two_separate_ones(scale):
    model, x, t, y = CountingModel(), torch.randn(5, 1, 28, 28), torch.full((5,), 7), torch.tensor([0, 1, 2, 3, 9])
    eps_cond, eps_uncond = model(x, t, y), model(x, t, None)
    model.calls, model.batch_sizes = 0, []
    eps = guided(model, y, scale)(x, t)
    assert model.calls == 1 and model.batch_sizes == [10]
    assert torch.allclose(eps, eps_uncond + scale * (eps_cond - eps_uncond), atol=1e-6)


def test_batched_guidance_matches_separate_passes_on_the_real_networks():
    for model in (UNet(base_channels=8, num_classes=10), ImprovedUNet(base_channels=8, channel_mults=(1, 2),
                                                                      attention=True, num_classes=10)):
        model.eval()  # BatchNorm on running statistics: a sample's output does not depend on its batch-mates
        x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 900]), torch.tensor([1, 5, 7])
        with torch.no_grad():
            expected = model(x, t) + 3.0 * (model(x, t, y) - model(x, t))
            assert torch.allclose(guided(model, y, 3.0)(x, t), expected, atol=1e-5)


class ExactGaussianClasses(nn.Module):
    """The exact ε-predictor of data x_0 ~ N(μ_y, s²I) for class y (and N(0, s²I) without a label):
    ε̂ = sqrt(1−ᾱ)·(x_t − sqrt(ᾱ)·μ) / (ᾱ·s² + 1 − ᾱ)."""

    def __init__(self, scheduler: NoiseScheduler, means: torch.Tensor, std: float):
        super().__init__()
        self.alpha_bars, self.means, self.std = scheduler.alpha_bars.float(), means, std

    def forward(self, x, t, labels=None):
        a = self.alpha_bars[t - 1].view(-1, 1, 1, 1)
        mu = torch.zeros(len(x)) if labels is None else torch.where(labels == NO_LABEL, 0.0, self.means[labels.clamp(min=0)])
        mu = mu.view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.std ** 2 + 1 - a)


def test_conditional_sampling_with_an_exact_denoiser_draws_each_class():
    """A known-perfect toy: per-class samples land on their class's mean, across batches, with every sampler."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=100))
    means = torch.linspace(-0.8, 0.8, 10)
    model = ExactGaussianClasses(scheduler, means, std=0.05)
    labels = per_class_labels([2, 7, 9], 6)
    for sampler, steps in (("ddpm", 0), ("ddim", 25), ("dpmpp2m", 10)):
        config = SampleConfig(sampler=sampler, steps=steps, n=len(labels), batch_size=7, clip="off")
        result = sample(model, scheduler, config, pixel_range="symmetric", labels=labels, guidance=1.0)
        pixels = torch.from_numpy(result.images).float() / 127.5 - 1
        for k in (2, 7, 9):
            assert abs(float(pixels[labels == k].mean()) - float(means[k])) < 0.03, (sampler, k)


def test_guidance_pushes_beyond_the_class_mean():
    """ε̃ extrapolates: with γ = 3 the toy samples overshoot μ_y away from the unconditional mean 0."""
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=100))
    model = ExactGaussianClasses(scheduler, torch.full((10,), 0.3), std=0.05)
    labels = torch.zeros(8, dtype=torch.long)
    config = SampleConfig(sampler="ddim", steps=25, n=8, clip="off")
    mean = {g: float(torch.from_numpy(sample(model, scheduler, config, pixel_range="symmetric", labels=labels,
                                              guidance=g).images).float().mean() / 127.5 - 1) for g in (0.0, 1.0, 3.0)}
    assert abs(mean[0.0]) < 0.03 and abs(mean[1.0] - 0.3) < 0.03 and mean[3.0] > 0.4


def test_class_names_and_label_layouts():
    assert class_index("Sneaker", "fashion_mnist") == 7 == class_index("sneaker", "fashion_mnist") == class_index(7, "fashion_mnist")
    for bad in ("10", "-1", "Boot", ""):
        with pytest.raises(ConfigError, match="class = .* is not allowed: choose 0..9"):
            class_index(bad, "fashion_mnist")
    assert per_class_labels([1, 3], 2).tolist() == [1, 1, 3, 3]
    assert torch.bincount(even_labels(1000, 10)).tolist() == [100] * 10
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="guidance = .* is not allowed"):
            guided(CountingModel(), torch.zeros(1, dtype=torch.long), bad)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_samples_a_class_row_and_a_grid_per_class(cond_run, tmp_path, capsys):
    assert main(["sample", "--run", str(cond_run), "--sampler", "ddim", "--steps", "3", "--class", "Sneaker",
                 "--guidance", "3", "--n", "4", "--quiet", "--out", str(tmp_path / "a.png"),
                 "--npy", str(tmp_path / "a.npy")]) == 0
    assert "class Sneaker, guidance 3" in capsys.readouterr().out
    assert main(["sample", "--run", str(cond_run), "--sampler", "ddim", "--steps", "3", "--per-class", "2",
                 "--quiet", "--out", str(tmp_path / "b.png"), "--npy", str(tmp_path / "b.npy")]) == 0
    assert "20 samples" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--class", "10"], "class = '10' is not allowed"),
    (["--class", "Boot"], "class = 'Boot' is not allowed"),
    (["--guidance", "-1"], "guidance = -1.0 is not allowed"),
    (["--guidance", "nan"], "guidance = nan is not allowed"),
    (["--per-class", "0"], "--per-class = 0 is not allowed"),
])
def test_cli_sample_bad_conditioning_is_one_line_exit_2(cond_run, argv, message, capsys):
    assert main(["sample", "--run", str(cond_run), "--sampler", "ddim", "--steps", "2", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_refuses_classes_on_unconditional_runs_and_dropout_without_labels(tiny_run, tmp_path, capsys):
    assert main(["sample", "--run", str(tiny_run), "--class", "3", "--quiet"]) == 2
    assert "--class is not allowed for run 'tiny': it is unconditional" in capsys.readouterr().err
    assert main(["eval", "--run", str(tiny_run), "--guidance-sweep", "0,3", "--quiet"]) == 2
    assert "--guidance-sweep is not allowed" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["train", "--preset", "tiny", "--label-dropout", "0.2", "--runs-dir", str(fresh)]) == 2
    assert "need a conditional run" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--conditional", "--label-dropout", "1", "--runs-dir", str(fresh)]) == 2
    assert "label_dropout = 1.0 is not allowed" in capsys.readouterr().err
    assert not fresh.exists() or not any(fresh.iterdir())


# -- evaluation ----------------------------------------------------------------------------------------
def test_frechet_of_features_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=gen, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4I): ||1||² + 3·(1 + 4 − 2·2) = 3 + 3
    assert frechet_distance_of_features(a, b) == pytest.approx(6.0, rel=0.08)
    assert frechet_distance_of_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_conditional_report_counts_requested_classes():
    test = tiny_split("test", 200, 2)
    classifier = clf.fit(tiny_split("train", 512, 1), test, clf.FitConfig(epochs=1, batch_size=32, max_steps=30, lr=3e-3))
    evaluator = QualityEvaluator(classifier, test)
    predicted = evaluator.logits(test.images).argmax(1)
    report = evaluator.conditional(test.images, predicted)        # asked for what it sees: accuracy 1
    assert report.conditional_accuracy == 1.0 and set(report.per_class_accuracy.values()) == {1.0}
    wrong = evaluator.conditional(test.images, (predicted + 1) % 10)
    assert wrong.conditional_accuracy == 0.0
    # per-class distance: a class's own test images are at distance 0 from themselves
    own = test.labels == 3
    assert evaluator.conditional(test.images[own], test.labels[own]).per_class_fd["Dress"] == pytest.approx(0, abs=1e-6)


def test_eval_guidance_sweep_stores_one_entry_per_scale(cond_run, tmp_path, capsys):
    data_root = write_idx(tmp_path / "data", tiny_split("train", 256, 11), tiny_split("test", 128, 12))
    classifiers = tmp_path / "classifiers"
    clf.save_classifier(clf.fit(tiny_split("train", 512, 1), tiny_split("test", 128, 2),
                                clf.FitConfig(epochs=1, batch_size=32, max_steps=15, lr=3e-3)),
                        clf.classifier_path("fashion_mnist", classifiers))
    assert main(["eval", "--run", str(cond_run), "--n", "20", "--sampler", "ddim", "--steps", "3",
                 "--guidance-sweep", "0,1,3", "--device", "cpu", "--quiet", "--classifier-dir", str(classifiers),
                 "--data-root", str(data_root)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [e["setting"] for e in lines] == ["ddim-3-g0", "ddim-3-g1", "ddim-3-g3"]
    assert [e["nfe"] for e in lines] == [3, 3, 6]
    for entry in lines:
        assert 0 <= entry["conditional_accuracy"] <= 1
        assert set(entry["per_class_accuracy"]) == set(CLASS_NAMES["fashion_mnist"])
        assert sum(entry["per_class_n"].values()) == 20 and len(entry["per_class_fd"]) == 10
    stored = [e["setting"] for e in runs.read_eval(cond_run)]
    assert stored[-3:] == ["ddim-3-g0", "ddim-3-g1", "ddim-3-g3"]


def test_bench_times_guided_against_unguided_steps():
    entry = measure_guidance(torch.device("cpu"), SMOKE, channels_last=False)
    assert entry["preset"] == "improved-cfg" and entry["guidance"] == 3.0
    assert entry["guided_step_s"] > 0 and entry["unguided_step_s"] > 0
    assert entry["guided_over_unguided"] == pytest.approx(entry["guided_step_s"] / entry["unguided_step_s"], rel=0.01)


def test_book_cfg_trains_with_per_batch_dropout(tmp_path):
    config = replace(PRESETS["book-cfg"], model=replace(PRESETS["book-cfg"].model, base_channels=8),
                     schedule=ScheduleConfig(timesteps=20),
                     train=replace(tiny_config().train, optimizer="adam", label_dropout=0.5, label_dropout_mode="batch",
                                   pixel_range="unit", max_steps=4, batch_size=16))
    run_dir = runs.create_run(tmp_path, "book-cfg", config)
    train_run(run_dir, images=make_tiny_images())
    loaded = runs.load_model(run_dir)
    assert isinstance(loaded.model, UNet) and loaded.model.label_emb.weight.shape == (10, 100)
    assert runs.run_info(run_dir).step == 4
