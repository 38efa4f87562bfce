"""`python -m core eval`: sample from a run and measure its quality, fit the classifier, or print
the real-data references.

    python -m core eval --run NAME_OR_DIR [--n 1000 --sampler ddim --steps 50 --eta 0 --seed 0]
    python -m core eval --run NAME_OR_DIR --sweep-steps 5,10,20,50 --samplers ddim,dpmpp2m,dpmpp2m-sde
    python -m core eval --run NAME_OR_DIR --guidance-sweep 0,1,3,5 [--class Sneaker]   (conditional runs)
    python -m core eval --fit-classifier [--dataset fashion_mnist]
    python -m core eval --run NAME_OR_DIR --fit-classifier   (fit on the run's own training split)
    python -m core eval --run NAME_OR_DIR --nearest [--n 1000 --sampler ddim --steps 50]
    python -m core eval --real [--dataset fashion_mnist --n 1000]

`--nearest` is the memorization check (docs/memorization.md): each sample's nearest training image,
the same for held-out real images, the share of near-copies, and the grid samples/nearest-SETTING.png
("sample | its nearest training image"); its entry goes into eval.json under "nearest-SETTING".

Each prints ONE JSON line per evaluated setting on stdout (messages and progress bars go to stderr);
`--run` also stores the entry in the run's eval.json under a `setting` key such as "ddpm-1000" or
"dpmpp2m-20", one entry per sampler setting (a sweep writes one per sampler and step count, with the
same seed and classifier, so they compare). A conditional run samples N/10 images of each class (or
of the --class given) at each guidance scale γ; its entries, keyed like "dpmpp2m-20-g3", add the
conditional accuracy and per-class accuracy and Fréchet distance. When the dataset's classifier does not exist yet (or is damaged, or from an
older architecture), it is fitted first, with a message: a fresh user gets a number, not a chore.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..store import runs
from .args import add_data_root, add_device, add_runs_dir, add_sampler_flags
from .argtypes import comma_list, number, whole_number
from ..config import DATASET_NAMES, SAMPLER_NAMES, ConfigError, SampleConfig
from ..data.datasets import load_images
from ..device import resolve_device
from ..errors import CliError, RunError
from ..diffusion.guidance import check_conditional, check_guidance, class_index, default_guidance, even_labels
from ..diffusion.schedule import NoiseScheduler
from ..evaluation.classifier import (ARCH_VERSION, REQUIRED_ACCURACY, Classifier, ClassifierError, FitConfig, classifier_path,
                         fit, fit_path, load_classifier, save_classifier)
from ..evaluation.frechet import QualityEvaluator, real_subset
from ..evaluation.scoring import score_setting, setting_name  # noqa: F401 - setting_name: part of this module's API
from ..evaluation.nearest import check_run
from ..evaluation.own_data import (class_names_of, fit_on_training_split, fitted_classifier, run_data,
                                   uses_fingerprint)

DEFAULT_N = 1000

def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="measure sample quality (Fréchet distance in a classifier's features)")
    add_arguments(ev)
    ev.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fréchet distance of generated samples to the test split in the 128-d features "
                          "of a small CNN classifier fitted by the project, with the floor (real training "
                          "images) and the noise ceiling at the same N, and the class shares of the samples.")
    what = parser.add_argument_group("what to do (one of)")
    what.add_argument("--run", help="evaluate this run: a run folder, or a run name under --runs-dir")
    what.add_argument("--fit-classifier", action="store_true",
                      help="fit (or refit) the classifier of --dataset and store it; with --run, of the run's "
                      "dataset (data other than the built-ins: on its own training split, stored by fingerprint)")
    parser.add_argument("--nearest", action="store_true",
                        help="with --run: the memorization check (each sample's nearest training image, "
                        "the share of near-copies, a grid of sample | nearest pairs in the run folder)")
    what.add_argument("--real", action="store_true",
                      help="print only the floor and noise ceiling of --dataset at --n")
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="dataset for --fit-classifier / --real (default fashion_mnist; --run uses its own)")
    add_runs_dir(parser)
    parser.add_argument("--n", type=whole_number, default=DEFAULT_N, help=f"number of samples (default {DEFAULT_N}); "
                        "compare only numbers taken at the same N")
    add_sampler_flags(parser)
    parser.add_argument("--sweep-steps", type=comma_list(whole_number), metavar="N,N,...",
                        help="evaluate every sampler of --samplers at each of these step counts")
    parser.add_argument("--samplers", type=comma_list(str), metavar="NAME,...",
                        help=f"samplers of a --sweep-steps ({', '.join(s for s in SAMPLER_NAMES if s != 'ddpm')})")
    parser.add_argument("--class", dest="classes", nargs="+", metavar="K|NAME",
                        help="conditional runs: evaluate these classes only (default: all, N/10 each)")
    parser.add_argument("--guidance", type=number, metavar="GAMMA",
                        help="conditional runs: classifier-free guidance γ (default 3, the book's)")
    parser.add_argument("--guidance-sweep", type=comma_list(number), metavar="G,G,...",
                        help="conditional runs: one entry per γ, e.g. 0,1,2,3,5,8 (the fidelity-diversity trade-off)")
    parser.add_argument("--seed", type=whole_number, default=0, help="seed of the samples, the floor's images and the noise")
    parser.add_argument("--batch-size", type=whole_number, default=250, help="images per forward pass")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights even when EMA exists")
    add_device(parser, "where to sample and classify")
    parser.add_argument("--classifier-dir", help="classifier cache folder (default data/classifiers or "
                        "$DDPM_CLASSIFIER_DIR)")
    parser.add_argument("--fit-epochs", type=whole_number, default=None, help="epochs when fitting the classifier (default 5)")
    add_data_root(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the classifier: load, or fit when missing ---------------------------------------------------------
def _fit_bar(args: argparse.Namespace, dataset: str):
    """(progress callback, close) of a classifier fit: a tqdm bar on stderr unless --quiet."""
    bar = None
    if not args.quiet:
        bar = tqdm(total=None, unit="step", desc=f"fit {dataset} classifier", dynamic_ncols=True, file=sys.stderr)

    def on_step(done: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)
            if done % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return on_step, (bar.close if bar is not None else (lambda: None))


def _fit_config(args: argparse.Namespace) -> FitConfig:
    return FitConfig() if args.fit_epochs is None else FitConfig(epochs=args.fit_epochs)


def fit_and_save(dataset: str, args: argparse.Namespace, device: torch.device) -> Classifier:
    train = load_images(dataset, "train", args.data_root)
    test = load_images(dataset, "test", args.data_root)
    on_step, close = _fit_bar(args, dataset)
    fitted = fit(train, test, _fit_config(args), device=device, progress=on_step)
    close()
    path = fit_path(dataset, args.classifier_dir)
    save_classifier(fitted, path)
    required = REQUIRED_ACCURACY[dataset]
    _log(f"classifier for {dataset}: test accuracy {fitted.test_accuracy:.2%} after {fitted.fit_seconds:.0f} s "
         f"-> {path}")
    if fitted.test_accuracy < required:
        _log(f"warning: below the {required:.0%} this project asks for; refit with more --fit-epochs")
    if classifier_path(dataset, args.classifier_dir) != path:
        _log(f"note: the shipped classifier stays the default, so scores compare across machines; "
             f"score with this one by passing --classifier-dir {path.parent}")
    return fitted


def fit_own_data(train, args: argparse.Namespace, device: torch.device) -> Classifier:
    """Fit the classifier of data other than the built-ins on its own training split (less a held-out
    part for the accuracy) and store it by dataset fingerprint."""
    on_step, close = _fit_bar(args, train.dataset)
    fitted = fit_on_training_split(train, class_names_of(train), args.classifier_dir, _fit_config(args),
                                   device=device, progress=on_step)
    close()
    _log(f"classifier for {train.dataset} ({len(fitted.class_names)} classes): held-out accuracy "
         f"{fitted.test_accuracy:.2%} after {fitted.fit_seconds:.0f} s -> {fitted.path}")
    return fitted


def run_classifier(train, args: argparse.Namespace, device: torch.device) -> Classifier:
    """The classifier that scores a run's data: the dataset's own for the built-ins, else the one fitted
    on exactly these images (fitted first, with a message, when there is none)."""
    if not uses_fingerprint(train.dataset):
        return obtain_classifier(train.dataset, args, device)
    found = fitted_classifier(train, class_names_of(train), args.classifier_dir, device)
    if found is not None:
        return found
    _log(f"no classifier fitted on these {train.dataset} images yet: fitting it now on the run's training split "
         "(once). To do this step on its own: python -m core eval --run NAME --fit-classifier")
    return fit_own_data(train, args, device)


def obtain_classifier(dataset: str, args: argparse.Namespace, device: torch.device) -> Classifier:
    """The dataset's classifier; fitted first (with a message) when it is missing or unusable."""
    try:
        classifier = load_classifier(dataset, args.classifier_dir, device=device)
        if classifier.note:  # a fallback is said out loud
            _log(f"note: {classifier.note}")
        return classifier
    except ClassifierError as exc:  # missing, damaged or older architecture: all are fixed by a fit
        reason = str(exc).split(";")[0]
    _log(f"{reason}: fitting it now on the {dataset} training split (once; a few minutes on a CPU). "
         f"To do this step on its own: python -m core eval --fit-classifier --dataset {dataset}")
    return fit_and_save(dataset, args, device)


# -- commands ------------------------------------------------------------------------------------------
def _cmd_fit(args: argparse.Namespace, device) -> dict[str, Any]:
    dataset = args.dataset or "fashion_mnist"
    fitted = fit_and_save(dataset, args, device)
    return {"dataset": dataset, "test_accuracy": round(fitted.test_accuracy, 4),
            "required_accuracy": REQUIRED_ACCURACY[dataset], "arch_version": ARCH_VERSION,
            "path": str(fitted.path), "sha256": fitted.sha256[:12], "seconds": round(fitted.fit_seconds, 1)}


def _cmd_real(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dataset = args.dataset or "fashion_mnist"
    _check_n(args.n)
    started = time.perf_counter()
    classifier = obtain_classifier(dataset, args, device)
    train = load_images(dataset, "train", args.data_root)
    evaluator = QualityEvaluator(classifier, load_images(dataset, "test", args.data_root), device,
                                 batch_size=args.batch_size)
    if evaluator.cache_note:
        _log(f"note: {evaluator.cache_note}")
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
    given = Path(args.run)
    if given.is_dir():
        return given
    runs_dir = Path(args.runs_dir) if args.runs_dir else runs.DEFAULT_RUNS_DIR
    if len(given.parts) > 1:  # a path, not a name: say it is missing instead of judging it as a name
        raise RunError(f"run {args.run!r}: no such run folder {given}")
    return runs.run_path(runs_dir, args.run)


def sample_settings(args: argparse.Namespace) -> list[SampleConfig]:
    """The sampler settings to evaluate: one, or the grid of --samplers x --sweep-steps. Every one is
    validated before any sampling starts."""
    common = dict(eta=args.eta, n=args.n, seed=args.seed, batch_size=args.batch_size, spacing=args.spacing,
                  clip=args.clip)
    if args.sweep_steps is None:
        if args.samplers is not None:
            raise CliError("--samplers needs --sweep-steps (e.g. --sweep-steps 10,20,50)")
        return [SampleConfig(sampler=args.sampler, steps=args.steps, **common)]
    samplers = args.samplers or ["ddim", "dpmpp2m", "dpmpp2m-sde"]
    for name in samplers:
        if name not in SAMPLER_NAMES or name == "ddpm":
            raise ConfigError(f"samplers = {name!r} is not allowed: a step sweep takes "
                              + ", ".join(s for s in SAMPLER_NAMES if s != "ddpm"))
    if not args.sweep_steps:
        raise ConfigError("sweep_steps is empty: give step counts like 5,10,20,50")
    return [SampleConfig(sampler=name, steps=steps, **common) for name in samplers for steps in args.sweep_steps]


def _cmd_run(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    _check_n(args.n)
    settings = sample_settings(args)
    run_dir, _ = _run_dataset(args)
    loaded = runs.load_model(run_dir, use_ema=not args.no_ema, device=device)
    if loaded.fallback:
        _log(f"note: run {loaded.name!r}: {loaded.fallback}")
    guidances, labels = conditioning(args, loaded)
    scheduler = NoiseScheduler(loaded.config.schedule)
    for config in settings:
        config.resolved_steps(scheduler.num_timesteps)  # a step count above T fails before any work
    # Load everything the evaluation needs before the long sampling, so a missing dataset fails fast.
    train, test = run_data(loaded.config, args.data_root)
    classifier = run_classifier(train, args, device)
    evaluator = QualityEvaluator(classifier, test, device, batch_size=args.batch_size)
    if evaluator.cache_note:
        _log(f"note: {evaluator.cache_note}")
    raw_weights = not loaded.used_ema and (run_dir / "ema.safetensors").exists()
    entries = []
    for config in settings:
        for guidance in guidances:
            entry = _evaluate_setting(args, config, loaded, scheduler, evaluator, train, raw_weights, device,
                                      labels, guidance)
            runs.append_eval(run_dir, entry)
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    return entries


def conditioning(args: argparse.Namespace, loaded: runs.LoadedRun) -> tuple[list[float], torch.Tensor | None]:
    """The guidance scales to evaluate and the labels of the N samples (None: unconditional run)."""
    config = loaded.config
    asked = [flag for flag, value in (("--class", args.classes), ("--guidance", args.guidance),
                                      ("--guidance-sweep", args.guidance_sweep)) if value is not None]
    if not config.model.conditional:
        if asked:
            check_conditional(config, loaded.name, what=asked[0])
        return [1.0], None
    if args.guidance is not None and args.guidance_sweep is not None:
        raise CliError("give --guidance or --guidance-sweep, not both")
    guidances = [check_guidance(g) for g in (args.guidance_sweep or [
        args.guidance if args.guidance is not None else default_guidance(config)])]
    classes = [class_index(c, config.data) for c in args.classes] if args.classes else \
        list(range(config.model.num_classes))
    return guidances, torch.tensor(classes)[even_labels(args.n, len(classes))]


def _evaluate_setting(args: argparse.Namespace, config: SampleConfig, loaded: runs.LoadedRun,
                      scheduler: NoiseScheduler, evaluator: QualityEvaluator, train, raw_weights: bool,
                      device: torch.device, labels: torch.Tensor | None = None,
                      guidance: float = 1.0) -> dict[str, Any]:
    def bar(process, total: int, description: str):
        return tqdm(process, total=total, unit="step", dynamic_ncols=True, desc=description, file=sys.stderr)

    return score_setting(config, loaded, scheduler, evaluator, train, raw_weights, device,
                         wrap=None if args.quiet else bar, labels=labels, guidance=guidance)


def _run_dataset(args: argparse.Namespace) -> tuple[Path, str]:
    run_dir = _resolve_run(args)
    dataset = runs.load_config(run_dir).data.dataset
    if args.dataset and args.dataset != dataset:
        raise ConfigError(f"dataset = {args.dataset!r} is not allowed: run {run_dir.name!r} was trained on "
                          f"{dataset!r} (leave --dataset out with --run)")
    return run_dir, dataset


def _cmd_run_fit(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`--run NAME --fit-classifier`: the built-ins as `--fit-classifier --dataset`; other data on the
    run's own training split, stored by fingerprint."""
    run_dir, dataset = _run_dataset(args)
    if not uses_fingerprint(dataset):
        args.dataset = dataset
        return _cmd_fit(args, device)
    train, _ = run_data(runs.load_config(run_dir), args.data_root)
    fitted = fit_own_data(train, args, device)
    return {"dataset": dataset, "fingerprint": fitted.fingerprint, "classes": list(fitted.class_names),
            "heldout_accuracy": round(fitted.test_accuracy, 4), "arch_version": ARCH_VERSION,
            "path": str(fitted.path), "sha256": fitted.sha256[:12], "seconds": round(fitted.fit_seconds, 1)}


def _cmd_nearest(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`--run NAME --nearest`: the memorization check at one sampler setting."""
    _check_n(args.n)
    for flag, value in (("--sweep-steps", args.sweep_steps), ("--samplers", args.samplers), ("--class", args.classes),
                        ("--guidance", args.guidance), ("--guidance-sweep", args.guidance_sweep)):
        if value is not None:
            raise CliError(f"--nearest checks one sampler setting (a conditional run: every class, at its "
                           f"default guidance); leave out {flag}")
    config = sample_settings(args)[0]
    run_dir, _ = _run_dataset(args)

    def bar(process, total: int, description: str):
        return tqdm(process, total=total, unit="step", dynamic_ncols=True, desc=description, file=sys.stderr)

    entry = check_run(run_dir, config, device=device, use_ema=not args.no_ema, classifier_dir=args.classifier_dir,
                      data_root=args.data_root, wrap=None if args.quiet else bar)
    _log(f"{entry['near_copy_share']:.1%} of {entry['n']} samples are near-copies of a training image "
         f"(held-out real images: {entry['pixels_heldout_near_copy_share']:.1%}); pairs: {run_dir / entry['grid']}")
    return entry


def run(args: argparse.Namespace) -> int:
    modes = [name for name, on in (("--run", args.run is not None), ("--fit-classifier", args.fit_classifier),
                                   ("--real", args.real)) if on]
    if args.nearest and args.run is None:
        raise CliError("--nearest needs --run NAME (the run whose samples are checked)")
    if args.nearest and args.fit_classifier:
        raise CliError("give --nearest or --fit-classifier, not both (run them one after the other)")
    if modes == ["--run", "--fit-classifier"]:
        modes = ["--run --fit-classifier"]
    if len(modes) != 1:
        raise CliError("eval needs exactly one of --run NAME, --fit-classifier or --real"
                       + (f" (got {' and '.join(modes)})" if modes else ""))
    device = resolve_device(args.device)
    try:
        if args.fit_classifier and args.run is not None:
            out = _cmd_run_fit(args, device)
        elif args.nearest:
            out = _cmd_nearest(args, device)
        elif args.fit_classifier:
            out = _cmd_fit(args, device)
        elif args.real:
            out = _cmd_real(args, device)
        else:
            _cmd_run(args, device)  # prints one line per setting as each finishes
            return 0
    except ClassifierError as exc:  # only reachable for a classifier saved but unreadable right after
        raise CliError(str(exc)) from None
    print(json.dumps(out), flush=True)
    return 0
