"""`python -m core bench` plumbing, the book's reference code, and the fast paths' equivalence.

No timing is asserted here: speed targets live in the benchmark's own output. These tests check
that the benchmark measures what it says (the product's step, the book's code) and that every
fast path gives the same numbers as the plain path.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from core.bench import reference
from core.bench.runner import BenchPlan, ProductTrainer, run_bench
from core.cli.main import main
from core.config import ModelConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig
from core.models import UNet, build_model
from core.models.embedding import sinusoidal_encoding
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler
from core.diffusion.solvers import ddpm_step, from_generator

from conftest import REPO, make_tiny_images

# A smaller plan than the CLI's --smoke, for the in-process structural test.
TINY = BenchPlan(mode="smoke", batch_size=2, samples=2, train_warmup=0, train_steps=1, ddpm_timed_steps=1,
                 ddim_steps=3, ddim_timed_steps=1, few_steps=2, reference_train_steps=1, reference_ddpm_timed_steps=1,
                 matmul_size=64, matmul_repeats=1, ablation_train_steps=1, ablation_sample_steps=1)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


# -- the benchmark's output ----------------------------------------------------------------------------
def test_bench_json_has_every_measurement_with_sane_types():
    result = run_bench(TINY, "cpu", synthetic_data=True)
    json.dumps(result)  # JSON-ready as it is
    assert result["mode"] == "smoke"
    assert result["device"]["type"] == "cpu" and result["device"]["threads"] >= 1
    assert result["device"]["torch"] == torch.__version__
    assert set(result["flags"]) >= {"train_channels_last", "sample_channels_last", "compile", "autocast"}
    matmul = result["matmul"]
    assert _is_number(matmul["gflops"]) and matmul["gflops"] > 0
    assert len(matmul["rounds_gflops"]) == 4 and matmul["gflops"] == max(matmul["rounds_gflops"])
    assert result["data"].startswith("synthetic")
    for name, preset in (("unet", "book"), ("improved_unet", "improved")):
        train = result["train"][name]
        assert train["preset"] == preset and train["batch_size"] == 2 and train["timed_steps"] == 1
        for key in ("images_per_s", "achieved_gflops", "fraction_of_matmul", "train_gflop_per_image",
                    "peak_memory_mb", "memory_before_mb"):
            assert _is_number(train[key]) and train[key] > 0, (name, key, train[key])
        assert train["peak_memory_mb"] >= train["memory_before_mb"] - 1
        # achieved GFLOP/s is images/s times the counted FLOPs per image
        assert train["achieved_gflops"] == pytest.approx(train["images_per_s"] * train["train_gflop_per_image"],
                                                         rel=0.02)
        assert train["fraction_of_matmul"] == pytest.approx(train["achieved_gflops"] / matmul["gflops"], rel=0.02)
        sampling = result["sampling"][name]
        assert sampling["ddpm_steps"] == 1000 and sampling["ddim_steps"] == 3 and sampling["rounds"] == 3
        assert sampling["ddpm_extrapolated"] is True and sampling["ddpm_timed_steps"] == 1
        assert _is_number(sampling["ddpm_s"]) and _is_number(sampling["ddim_s"]) and sampling["ddim_s"] > 0
        assert sampling["ddim_over_ddpm"] == pytest.approx(sampling["ddim_s"] / sampling["ddpm_s"], rel=0.01)
        assert sampling["dpmpp2m_steps"] == 2 and _is_number(sampling["dpmpp2m_s"]) and sampling["dpmpp2m_s"] > 0
        assert sampling["dpmpp2m_over_ddpm"] == pytest.approx(sampling["dpmpp2m_s"] / sampling["ddpm_s"], rel=0.01)
        ablation = result["fast_paths"]["channels_last"][name]
        for key in ("train_speedup_on_vs_off", "sample_speedup_on_vs_off"):
            assert _is_number(ablation[key]) and ablation[key] > 0
    ref = result["reference"]
    for key in ("images_per_s", "ddpm_s", "train_speedup", "ddpm_speedup", "product_images_per_s_interleaved",
                "product_ddpm_s_interleaved", "ddim50_speedup_over_book_ddpm", "dpmpp2m_speedup_over_book_ddpm"):
        assert _is_number(ref[key]) and ref[key] > 0, key
    assert ref["ddpm_extrapolated"] is True
    # the speed-ups are ratios of the interleaved timings
    product_ips = ref["product_images_per_s_interleaved"]
    assert ref["train_speedup"] == pytest.approx(product_ips / ref["images_per_s"], rel=0.02)
    assert ref["ddpm_speedup"] == pytest.approx(ref["ddpm_s"] / ref["product_ddpm_s_interleaved"], rel=0.02)
    targets = result["targets"]
    for key in ("unet_fraction_met", "improved_unet_fraction_met", "ddim50_over_ddpm1000_met",
                "cpu_train_peak_rss_met", "solver_overhead_met", "dpmpp2m_speedup_met"):
        assert isinstance(targets[key], bool), key
    assert targets["gpu_speedup_met"] is None  # only judged on CUDA
    overhead = result["scheduler_step_overhead"]
    assert _is_number(overhead["ddpm_step_us"]) and _is_number(overhead["dpmpp2m_step_us"])
    assert overhead["dpmpp2m_fraction_of_network_eval"] == pytest.approx(
        overhead["dpmpp2m_step_us"] / 1e6 / result["sampling"]["unet"]["network_eval_s"], rel=0.05)
    noise = result["noise_streams"]  # per-image noise streams against one batched draw, same run
    assert noise["n"] == result["sampling"]["unet"]["n"] and isinstance(targets["noise_streams_met"], bool)
    assert noise["per_image_over_batched"] == pytest.approx(noise["per_image_draw_us"] / noise["batched_draw_us"],
                                                            rel=0.05)
    extra = (noise["setup_us"] + 20 * max(noise["per_image_draw_us"] - noise["batched_draw_us"], 0)) / 1e6
    assert noise["extra_fraction_of_sampling"] == pytest.approx(
        extra / (20 * result["sampling"]["unet"]["network_eval_s"]), rel=0.05, abs=1e-4)


def test_bench_cli_writes_the_same_json_it_prints(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--smoke", "--device", "cpu", "--synthetic-data", "--no-reference", "--no-ablation",
                 "--channels-last", "off", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["reference"] is None and printed["fast_paths"] is None
    assert printed["flags"]["train_channels_last"] is False and printed["flags"]["sample_channels_last"] is False


@pytest.mark.parametrize("argv, words", [
    (["bench", "--batch-size", "0"], ["--batch-size", "'0'", "at least 1"]),
    (["bench", "--channels-last", "maybe"], ["--channels-last", "'maybe'", "on or off"]),
    (["bench", "--quick", "--smoke"], ["--smoke", "not allowed"]),
])
def test_bench_cli_rejects_bad_values_with_a_clear_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_bench_plan_rejects_nonsense():
    with pytest.raises(ValueError, match="train_steps = 0 is not allowed"):
        BenchPlan(train_steps=0)


# -- the book's reference code equals the product on the same weights ----------------------------------
def test_reference_time_encoding_equals_the_product():
    t = torch.tensor([1, 2, 17, 500, 999, 1000])
    assert torch.equal(reference.pos_encoding(t, 100), sinusoidal_encoding(t, 100))


@pytest.mark.parametrize("train_mode", [False, True])
def test_reference_unet_output_equals_the_product_unet(train_mode):
    torch.manual_seed(0)
    book = reference.UNet()
    product = UNet()  # the book preset's model: base width 64, D = 100
    product.load_state_dict(book.state_dict())
    book.train(train_mode)
    product.train(train_mode)
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([1, 500, 1000])
    with torch.no_grad():
        torch.testing.assert_close(product(x, t), book(x, t), rtol=1e-5, atol=1e-5)


def test_reference_diffuser_matches_the_scheduler():
    """The book's add_noise and denoise against NoiseScheduler (float64 tables, cast at use)."""
    torch.manual_seed(0)
    diffuser, scheduler = reference.Diffuser(1000), NoiseScheduler(ScheduleConfig(timesteps=1000))
    x_0 = torch.rand(4, 1, 28, 28)
    t = torch.tensor([1, 10, 500, 1000])
    torch.manual_seed(1)
    x_t, noise = diffuser.add_noise(x_0, t)
    torch.testing.assert_close(scheduler.add_noise(x_0, t, noise), x_t, rtol=1e-5, atol=1e-5)

    model = reference.UNet()
    x = torch.randn(2, 1, 28, 28)
    for step in (1000, 500, 2, 1):
        t = torch.full((2,), step)
        model.eval()
        with torch.no_grad():
            eps = model(x, t)
        torch.manual_seed(7)  # the book draws its noise from the global generator
        book = diffuser.denoise(model, x, t)
        # a fresh CPU generator with the same seed draws the same numbers as the global one
        product = ddpm_step(scheduler, eps, step, x, noise=from_generator(torch.Generator().manual_seed(7), x))
        torch.testing.assert_close(product.prev_sample, book, rtol=1e-4, atol=1e-5)
    assert model.training  # the book toggles back to train() after every step


def test_reference_dataloader_gives_unit_range_images_like_totensor():
    images = make_tiny_images(16).images
    x, _ = next(iter(reference.make_dataloader(images, batch_size=16)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # a permutation of the same images, each scaled by 1/255
    assert torch.allclose(torch.sort(x.flatten()).values, torch.sort(images.flatten().float() / 255).values)


# -- fast paths give the same numbers -------------------------------------------------------------------
def _tiny_run(name: str, channels_last: bool) -> RunConfig:
    model = ModelConfig(name="unet", base_channels=8) if name == "unet" else \
        ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), attention=True)
    return RunConfig(model=model, schedule=ScheduleConfig(timesteps=20),
                     train=TrainConfig(batch_size=8, device="cpu", channels_last=channels_last, max_steps=3,
                                       pixel_range="symmetric", grad_clip=1.0, ema_decay=0.9))


@pytest.mark.parametrize("name", ["unet", "improved_unet"])
def test_channels_last_training_gives_the_same_losses(name):
    images = make_tiny_images(64).images
    losses = {}
    for flag in (False, True):
        trainer = ProductTrainer(_tiny_run(name, flag), torch.device("cpu"), images, batch_size=8)
        losses[flag] = torch.stack([trainer.step().detach() for _ in range(3)])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "improved_unet"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_channels_last_sampling_gives_the_same_images(name, sampler):
    torch.manual_seed(0)
    model = build_model(_tiny_run(name, False).model)
    scheduler = NoiseScheduler(ScheduleConfig(timesteps=20))
    config = SampleConfig(sampler=sampler, steps=20 if sampler == "ddpm" else 5, n=4, seed=3)
    plain = sample(model, scheduler, config, pixel_range="symmetric", channels_last=False).images
    fast = sample(model, scheduler, config, pixel_range="symmetric", channels_last=True).images
    # uint8 images: at most one grey level apart where float rounding crosses a boundary
    assert (plain.astype(int) - fast.astype(int)).__abs__().max() <= 1
    assert (plain != fast).mean() < 0.01


def test_channels_last_forward_matches_within_float_tolerance():
    for name in ("unet", "improved_unet"):
        torch.manual_seed(0)
        model = build_model(_tiny_run(name, False).model).eval()
        x = torch.randn(4, 1, 28, 28)
        t = torch.tensor([1, 5, 10, 20])
        with torch.inference_mode():
            plain = model(x, t)
            fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_training_step_is_what_the_loop_runs(tmp_path):
    """train_run's losses equal ProductTrainer's over the same batches: the bench times the loop's step."""
    from core.store import runs
    from core.train.training import train_run
    images = make_tiny_images(64)
    config = _tiny_run("improved_unet", False)
    config = replace(config, train=replace(config.train, log_every=1, sample_every_epochs=0, checkpoint_every_s=0.0,
                                           lr=1e-3, seed=5))
    run_dir = runs.create_run(tmp_path, "t", config)
    progress = train_run(run_dir, images=images)
    # The loop draws its permutation from (seed, epoch); reproduce it and step the same batches.
    trainer = ProductTrainer(config, torch.device("cpu"), images.images, batch_size=8)
    gen = torch.Generator().manual_seed(config.train.seed * 100_003 + 0)
    trainer.order = torch.randperm(64, generator=gen)
    losses = [trainer.step().item() for _ in range(3)]
    assert losses == pytest.approx(progress.losses, rel=1e-6)


def test_starting_the_cli_does_not_load_the_evaluation_stack():
    """torchmetrics (with scipy and matplotlib) and pandas (with pyarrow) took 163 MB of RSS in every
    `python -m core` process, training and `bench` included, where they are the base of the peak
    memory reported: they are imported where FID and the report need them."""
    heavy = ("torchmetrics", "scipy", "matplotlib", "pandas", "pyarrow")
    code = f"import sys, core.cli.main; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
