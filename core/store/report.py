"""A results page for a set of runs: overlaid loss curves (PNG), their sample grids side by side (PNG)
and a Markdown table of their evaluation figures. `python -m core report --runs A B --out docs/`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from . import runs
from ..config import run_label as recipe_label
from .io import MAX_IMAGE_BYTES, read_bounded_bytes


def ema_smooth(values, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction, like TensorBoard's smoothing slider:
    weight 0 = raw, 0.99 = very smooth. pandas' `ewm(adjust=True)` is exactly this debiased form."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0 or weight <= 0:
        return values
    import pandas as pd  # here, not at the top: pandas and pyarrow cost ~60 MB of RSS in every CLI command
    return pd.Series(values).ewm(alpha=1 - weight, adjust=True).mean().to_numpy()


def run_label(info: runs.RunInfo) -> str:
    return f"{recipe_label(info.config)} ({info.name})"


def loss_curves_png(infos: list[runs.RunInfo], out: Path, x_axis: str = "elapsed_s", smoothing: float = 0.9,
                    labels: dict[str, str] | None = None,
                    title: str = "Training loss: the book's UNet + Adam vs ImprovedUNet + AdamW") -> Path:
    """Overlaid smoothed loss curves; `labels` names runs (default: recipe and run name). A curve
    hidden under an identical one (a change that does not touch training, like EMA) is dashed."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    drawn: list[np.ndarray] = []
    for info in infos:
        rows = runs.read_metrics(info.path)
        if not rows:
            continue
        x = np.array([r[x_axis] for r in rows]) / (60.0 if x_axis == "elapsed_s" else 1.0)
        y = ema_smooth([r["loss"] for r in rows], smoothing)
        twin = any(len(d) == len(y) and np.allclose(d, y) for d in drawn)
        drawn.append(y)
        ax.plot(x, y, label=(labels or {}).get(info.name, run_label(info)), linewidth=1.6,
                linestyle="--" if twin else "-")
    ax.set_yscale("log")
    ax.set_xlabel({"elapsed_s": "wall-clock training time (minutes)", "step": "step", "epoch": "epoch"}[x_axis])
    ax.set_ylabel(f"MSE loss (EMA-smoothed, {smoothing})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def comparable_evals(infos: list[runs.RunInfo]) -> list[tuple[runs.RunInfo, dict]]:
    """The eval entries that can share one chart: those of the most common (N, classifier) pair.
    Fréchet distances taken at another N or with another classifier are on another scale."""
    entries = [(info, e) for info in infos for e in info.evals
               if isinstance(e, dict) and isinstance(e.get("fd"), (int, float)) and isinstance(e.get("steps"), int)]
    if not entries:
        return []
    keys = [(e.get("n"), e.get("classifier_sha256")) for _, e in entries]
    common = max(set(keys), key=keys.count)
    return [(info, e) for (info, e), key in zip(entries, keys) if key == common]


def sampler_series(entries: list[tuple[runs.RunInfo, dict]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(run label, sampler setting without the step count) -> [(network evaluations, FD)], sorted."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for info, e in entries:
        if e.get("sampler") == "ddpm" or str(e.get("setting", "")).endswith("-raw"):
            continue
        name = e["sampler"] + ("" if e.get("spacing") in (None, "uniform") else f" ({e['spacing']})")
        series.setdefault((run_label(info), name), []).append((int(e.get("nfe") or e["steps"]), float(e["fd"])))
    return {key: sorted(points) for key, points in series.items()}


def steps_quality_png(infos: list[runs.RunInfo], out: Path) -> Path | None:
    """Fréchet distance against network evaluations per image, one line per run and sampler, and each
    run's DDPM (all T steps) as a dashed horizontal line: how many steps does this model need?"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    entries = comparable_evals(infos)
    series = sampler_series(entries)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(10.5, 4.5), dpi=120)
    for (label, sampler), points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{sampler} · {label}")
    for info, e in entries:
        if e.get("sampler") == "ddpm" and e.get("clip") in (None, False):
            ax.axhline(e["fd"], linestyle="--", color="grey", linewidth=1)
            # x in axes fraction, y in data: the label sits at the left end of its line
            ax.text(0.01, e["fd"], f"DDPM {e['steps']} steps · {run_label(info)}", fontsize=7, color="dimgrey",
                    transform=ax.get_yaxis_transform(), va="bottom")
    n, sha = entries[0][1].get("n"), entries[0][1].get("classifier_sha256")
    ax.set_xscale("log")
    ax.set_yscale("log")  # runs far apart in quality stay readable on one chart
    ax.set_xlabel("network evaluations per image (steps)")
    ax.set_ylabel(f"Fréchet distance (N = {n}, classifier {sha})")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes, not 2 × 10^1
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([t for t in (3, 4, 5, 6, 8, 10, 15, 20, 30, 50) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Quality against sampling steps")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def sweep_table(infos: list[runs.RunInfo]) -> str:
    """Markdown: Fréchet distance per sampler (rows) and step count (columns), per run."""
    series = sampler_series(comparable_evals(infos))
    steps = sorted({n for points in series.values() for n, _ in points})
    lines = ["| run | sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for (label, sampler), points in series.items():
        by_steps = dict(points)
        lines.append(f"| {label} | {sampler} | " + " | ".join(_num(by_steps.get(n)) for n in steps) + " |")
    return "\n".join(lines)


def grids_side_by_side_png(grids: list[tuple[str, Path]], out: Path) -> Path:
    """Put existing grid PNGs next to each other with a caption above each."""
    from PIL import Image, ImageDraw

    # bounded, regular files only: a grid planted as a symlink to /dev/zero must not hang the report
    images = [(label, Image.open(io.BytesIO(read_bounded_bytes(path, MAX_IMAGE_BYTES, path.parent.parent.name)))
               .convert("L")) for label, path in grids]
    gap, caption = 16, 22
    width = sum(im.width for _, im in images) + gap * (len(images) + 1)
    height = max(im.height for _, im in images) + caption + 2 * gap
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for label, im in images:
        draw.text((x, gap // 2), label, fill=0)
        canvas.paste(im, (x, gap + caption))
        x += im.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def eval_table(infos: list[runs.RunInfo]) -> str:
    """Markdown: one row per (run, sampler setting) with the figures eval.json holds."""
    lines = ["| run | sampler | weights | N | Fréchet distance | floor | ratio to floor | noise ceiling | "
             "class entropy | min / max class share | mean confidence |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for info in infos:
        for e in info.evals:
            shares = _shares(e.get("class_shares"))
            share_text = f"{min(shares):.1%} / {max(shares):.1%}" if shares else "-"
            lines.append(
                f"| {run_label(info)} | {_text(e.get('setting'))} | {_text(e.get('weights'))} | {_num(e.get('n'))} | "
                f"{_num(e.get('fd'))} | {_num(e.get('fd_floor'))} | {_num(e.get('fd_ratio'))} | "
                f"{_num(e.get('fd_noise'))} | {_num(e.get('class_entropy'))} | {share_text} | "
                f"{_num(e.get('mean_confidence'))} |")
    return "\n".join(lines)


def _num(value) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:.3g}" if ok else "-"


def _text(value) -> str:
    """A string from eval.json, kept to one table cell (no '|' or line breaks from a hostile file)."""
    return " ".join(value.replace("|", "/").split())[:60] if isinstance(value, str) else "?"


def _shares(value) -> list[float]:
    if not isinstance(value, dict):
        return []
    shares = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return shares if len(shares) == len(value) else []


# -- a sweep -----------------------------------------------------------------------------------------
def sweep_results_table(rows: list[dict]) -> str:
    """Markdown: one row per run of a sweep (core.sweeps.results), in the sweep's order, with the
    change from the row before in Fréchet distance."""
    lines = ["| # | change | steps | images | training time | final loss | Fréchet distance | ratio to floor | "
             "vs the row before | class entropy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    previous = None
    for index, row in enumerate(rows, 1):
        fd = row.get("fd")
        delta = f"{(fd - previous) / previous:+.0%}" if fd is not None and previous else "-"
        minutes = f"{row['train_s'] / 60:.1f} min" if row.get("train_s") is not None else "-"
        lines.append(f"| {index} | {_text(row.get('label'))} | {row.get('steps', 0)} | {row.get('images', 0):,} | "
                     f"{minutes} | {_num(row.get('final_loss'))} | {_num(fd)} | {_num(row.get('fd_ratio'))} | {delta} | "
                     f"{_num(row.get('class_entropy'))} |")
        previous = fd if fd is not None else previous
    return "\n".join(lines)


def sweep_fd_png(rows: list[dict], out: Path, title: str = "") -> Path | None:
    """A bar per scored run of a sweep, labelled with the change it made, the floor dashed."""
    scored = [(i, r) for i, r in enumerate(rows, 1) if isinstance(r.get("fd"), (int, float))]
    if not scored:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    labels = [f"{i}. {_text(r.get('label'))}" for i, r in scored]
    values = [r["fd"] for _, r in scored]
    bars = ax.bar(range(len(values)), values, color="#4C6EF5")
    for bar, (_, r) in zip(bars, scored):
        ratio = f"\n{r['fd_ratio']:.1f}×" if isinstance(r.get("fd_ratio"), (int, float)) else ""
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['fd']:.1f}{ratio}", ha="center",
                va="bottom", fontsize=8)
    floor = next((r["floor"] for _, r in scored if isinstance(r.get("floor"), (int, float))), None)
    if floor is not None:
        ax.axhline(floor, color="#2B8A3E", linestyle="--", linewidth=1, label=f"floor {floor:.2f} (real images)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"Fréchet distance, N = {scored[0][1].get('n')} (lower is better)")
    ax.set_ylim(0, max(values) * 1.2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
