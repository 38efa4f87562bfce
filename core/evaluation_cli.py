"""`python -m core eval`: sample from a run and measure its quality, fit the classifier, or print
the real-data references.

    python -m core eval --run NAME_OR_DIR [--n 1000 --sampler ddim --steps 50 --eta 0 --seed 0]
    python -m core eval --fit-classifier [--dataset fashion_mnist]
    python -m core eval --real [--dataset fashion_mnist --n 1000]

Each prints ONE JSON line on stdout (messages and progress bars go to stderr); `--run` also stores
the entry in the run's eval.json under a `setting` key such as "ddpm-1000" or "ddim-50", one entry
per sampler setting. When the dataset's classifier does not exist yet (or is damaged, or from an
older architecture), it is fitted first, with a message: a fresh user gets a number, not a chore.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .argtypes import number, whole_number
from .config import DATASET_NAMES, DEVICE_NAMES, SAMPLER_NAMES, ConfigError, SampleConfig

DEFAULT_N = 1000




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fréchet distance of generated samples to the test split in the 128-d features "
                          "of a small CNN classifier fitted by the project, with the floor (real training "
                          "images) and the noise ceiling at the same N, and the class shares of the samples.")
    what = parser.add_argument_group("what to do (one of)")
    what.add_argument("--run", help="evaluate this run: a run folder, or a run name under --runs-dir")
    what.add_argument("--fit-classifier", action="store_true",
                      help="fit (or refit) the classifier of --dataset and store it")
    what.add_argument("--real", action="store_true",
                      help="print only the floor and noise ceiling of --dataset at --n")
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="dataset for --fit-classifier / --real (default fashion_mnist; --run uses its own)")
    parser.add_argument("--runs-dir", help="folder of run folders (default checkpoints)")
    parser.add_argument("--n", type=whole_number, default=DEFAULT_N, help=f"number of samples (default {DEFAULT_N}); "
                        "compare only numbers taken at the same N")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm", help="ddpm (the book) or ddim")
    parser.add_argument("--steps", type=whole_number, default=0, help="reverse steps (ddim; default T)")
    parser.add_argument("--eta", type=number, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    parser.add_argument("--seed", type=whole_number, default=0, help="seed of the samples, the floor's images and the noise")
    parser.add_argument("--batch-size", type=whole_number, default=250, help="images per forward pass")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights even when EMA exists")
    parser.add_argument("--device", choices=DEVICE_NAMES, default="auto", help="where to sample and classify")
    parser.add_argument("--classifier-dir", help="classifier cache folder (default data/classifiers or "
                        "$DDPM_CLASSIFIER_DIR)")
    parser.add_argument("--fit-epochs", type=whole_number, default=None, help="epochs when fitting the classifier (default 5)")
    parser.add_argument("--data-root", help="folder holding FashionMNIST/raw or MNIST/raw (env DDPM_DATA_ROOT)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- the classifier: load, or fit when missing ---------------------------------------------------------
def fit_and_save(dataset: str, args: argparse.Namespace, device) -> "Classifier":  # noqa: F821
    from .classifier import REQUIRED_ACCURACY, FitConfig, classifier_path, fit, save_classifier
    from .data import load_images

    config = FitConfig() if args.fit_epochs is None else FitConfig(epochs=args.fit_epochs)
    train = load_images(dataset, "train", args.data_root)
    test = load_images(dataset, "test", args.data_root)
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=None, unit="step", desc=f"fit {dataset} classifier", dynamic_ncols=True, file=sys.stderr)

    def on_step(done: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)
            if done % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    fitted = fit(train, test, config, device=device, progress=on_step)
    if bar is not None:
        bar.close()
    path = classifier_path(dataset, args.classifier_dir)
    save_classifier(fitted, path)
    required = REQUIRED_ACCURACY[dataset]
    _log(f"classifier for {dataset}: test accuracy {fitted.test_accuracy:.2%} after {fitted.fit_seconds:.0f} s "
         f"-> {path}")
    if fitted.test_accuracy < required:
        _log(f"warning: below the {required:.0%} this project asks for; refit with more --fit-epochs")
    return fitted


def obtain_classifier(dataset: str, args: argparse.Namespace, device) -> "Classifier":  # noqa: F821
    """The dataset's classifier; fitted first (with a message) when it is missing or unusable."""
    from .classifier import ClassifierError, load_classifier

    try:
        return load_classifier(dataset, args.classifier_dir, device=device)
    except ClassifierError as exc:  # missing, damaged or older architecture: all are fixed by a fit
        reason = str(exc).split(";")[0]
    _log(f"{reason}: fitting it now on the {dataset} training split (once; a few minutes on a CPU). "
         f"To do this step on its own: python -m core eval --fit-classifier --dataset {dataset}")
    return fit_and_save(dataset, args, device)


# -- commands ------------------------------------------------------------------------------------------
def _cmd_fit(args: argparse.Namespace, device) -> dict[str, Any]:
    dataset = args.dataset or "fashion_mnist"
    fitted = fit_and_save(dataset, args, device)
    from .classifier import ARCH_VERSION, REQUIRED_ACCURACY
    return {"dataset": dataset, "test_accuracy": round(fitted.test_accuracy, 4),
            "required_accuracy": REQUIRED_ACCURACY[dataset], "arch_version": ARCH_VERSION,
            "path": str(fitted.path), "sha256": fitted.sha256[:12], "seconds": round(fitted.fit_seconds, 1)}


def _cmd_real(args: argparse.Namespace, device) -> dict[str, Any]:
    from .data import load_images
    from .evaluation import QualityEvaluator, real_subset

    dataset = args.dataset or "fashion_mnist"
    _check_n(args.n)
    started = time.perf_counter()
    classifier = obtain_classifier(dataset, args, device)
    train = load_images(dataset, "train", args.data_root)
    evaluator = QualityEvaluator(classifier, load_images(dataset, "test", args.data_root), device,
                                 batch_size=args.batch_size)
    real = real_subset(train, args.n, args.seed)
    stats = evaluator.class_statistics(real)
    return {"dataset": dataset, "n": args.n, "seed": args.seed,
            "fd_floor": round(evaluator.floor(train, args.n, args.seed), 4),
            "fd_noise": round(evaluator.noise_ceiling(args.n, args.seed), 4),
            "floor_class_entropy": round(stats["class_entropy"], 4),
            "floor_mean_confidence": round(stats["mean_confidence"], 4),
            "classifier_accuracy": round(classifier.test_accuracy, 4), "classifier_sha256": classifier.sha256[:12],
            "seconds": round(time.perf_counter() - started, 1)}


def _check_n(n: int) -> None:
    if n < 2:
        raise ConfigError(f"n = {n} is not allowed: the Fréchet distance needs at least 2 images "
                          "(compare numbers taken at N >= 1000)")


def _resolve_run(args: argparse.Namespace) -> Path:
    from . import runs
    given = Path(args.run)
    if given.is_dir():
        return given
    runs_dir = Path(args.runs_dir) if args.runs_dir else runs.DEFAULT_RUNS_DIR
    if len(given.parts) > 1:  # a path, not a name: say it is missing instead of judging it as a name
        raise runs.RunError(f"run {args.run!r}: no such run folder {given}")
    return runs.run_path(runs_dir, args.run)


def setting_name(sampler: str, steps: int, eta: float, raw_weights: bool) -> str:
    """The eval.json key of a sampler setting: ddpm-1000, ddim-50, ddim-50-eta0.5, ...-raw."""
    name = f"{sampler}-{steps}"
    if sampler == "ddim" and eta > 0:
        name += f"-eta{eta:g}"
    return name + ("-raw" if raw_weights else "")


def _cmd_run(args: argparse.Namespace, device) -> dict[str, Any]:
    from . import runs
    from .data import load_images
    from .evaluation import QualityEvaluator
    from .sampling import sample
    from .schedule import NoiseScheduler

    _check_n(args.n)
    sample_config = SampleConfig(sampler=args.sampler, steps=args.steps, eta=args.eta, n=args.n,
                                 seed=args.seed, batch_size=args.batch_size)
    run_dir = _resolve_run(args)
    dataset = runs.load_config(run_dir).train.dataset
    if args.dataset and args.dataset != dataset:
        raise ConfigError(f"dataset = {args.dataset!r} is not allowed: run {run_dir.name!r} was trained on "
                          f"{dataset!r} (leave --dataset out with --run)")
    loaded = runs.load_model(run_dir, use_ema=not args.no_ema, device=device)
    scheduler = NoiseScheduler(loaded.config.schedule)
    steps = sample_config.resolved_steps(scheduler.num_timesteps)
    started_at, started = _now(), time.perf_counter()
    # Load everything the evaluation needs before the long sampling, so a missing dataset fails fast.
    classifier = obtain_classifier(dataset, args, device)
    train = load_images(dataset, "train", args.data_root)
    evaluator = QualityEvaluator(classifier, load_images(dataset, "test", args.data_root), device,
                                 batch_size=args.batch_size)

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=None, unit="step", desc=f"{args.sampler} {steps} steps, {args.n} images",
                   dynamic_ncols=True, file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    sample_start = time.perf_counter()
    result = sample(loaded.model, scheduler, sample_config, pixel_range=loaded.config.train.pixel_range,
                    device=device, progress=on_step)
    if bar is not None:
        bar.close()
    sampling_s = time.perf_counter() - sample_start
    eval_start = time.perf_counter()
    import torch
    report = evaluator.evaluate(torch.from_numpy(result.images), train, seed=args.seed)
    eval_s = time.perf_counter() - eval_start

    raw_weights = not loaded.used_ema and (run_dir / "ema.safetensors").exists()
    entry = {"setting": setting_name(args.sampler, steps, args.eta, raw_weights),
             "sampler": args.sampler, "steps": steps, "eta": args.eta if args.sampler == "ddim" else None,
             "weights": "ema" if loaded.used_ema else "raw", "seed": args.seed, **report.to_dict(),
             "dataset": dataset, "classifier_accuracy": round(classifier.test_accuracy, 4),
             "classifier_sha256": classifier.sha256[:12], "device": str(device),
             "started_at": started_at, "finished_at": _now(), "seconds_sampling": round(sampling_s, 1),
             "seconds_eval": round(eval_s, 1), "seconds": round(time.perf_counter() - started, 1)}
    runs.append_eval(run_dir, entry)
    return entry


def run(args: argparse.Namespace) -> int:
    from .classifier import ClassifierError
    from .cli import CliError
    from .training import resolve_device

    modes = [name for name, on in (("--run", args.run is not None), ("--fit-classifier", args.fit_classifier),
                                   ("--real", args.real)) if on]
    if len(modes) != 1:
        raise CliError("eval needs exactly one of --run NAME, --fit-classifier or --real"
                       + (f" (got {' and '.join(modes)})" if modes else ""))
    device = resolve_device(args.device)
    try:
        if args.fit_classifier:
            out = _cmd_fit(args, device)
        elif args.real:
            out = _cmd_real(args, device)
        else:
            out = _cmd_run(args, device)
    except ClassifierError as exc:  # only reachable for a classifier saved but unreadable right after
        raise CliError(str(exc)) from None
    print(json.dumps(out), flush=True)
    return 0
