"""Figures and tables for the pages: plotly figures, pandas frames, scaled-up image grids.

Plain functions of plain data (no Streamlit calls), so they are easy to test and to reuse.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.config import PIXEL_RANGE_LABELS, SAMPLER_LABELS, RunConfig
from core.config import run_label as recipe_label
from core.store.export import make_grid
from core.store.report import ema_smooth as smooth
from core.store.runs import RunInfo
from core.train.training import steps_per_epoch

from .presets import UNUSED_MODEL_FIELDS

TRAIN_SPLIT_SIZE = 60_000  # FashionMNIST and MNIST both have 60k training images

# A qualitative palette with enough contrast on white; one colour per run.
PALETTE = ("#4C6EF5", "#E8590C", "#2B8A3E", "#C2255C", "#7048E8", "#0B7285", "#E67700", "#495057")
# Log axes labelled at 1, 2, 5 × 10^k as plain numbers (plotly's default labels every digit).
# Plain tick labels on log axes (1, 2, 5, 10, 20, 50, ...): plotly's own read "5.0 … 1.0e+2".
LOG_TICKS = [m * 10 ** e for e in range(-4, 5) for m in (1, 2, 5)]
LOG_AXIS = dict(type="log", tickvals=LOG_TICKS, ticktext=[f"{v:g}" for v in LOG_TICKS])
NEAR_RTOL = 0.03  # smoothed curves within 3 % of each other lie on top of each other at chart scale
X_AXES = {"step": ("step", "step"), "epoch": ("epoch_fraction", "epoch"),
          "wall-clock": ("elapsed_min", "wall-clock minutes"), "fraction of run": ("run_fraction", "fraction of the run")}
DASHES = ("solid", "dash", "dot", "dashdot")


def assign_colours(names: Iterable[str], assigned: dict[str, str] | None = None) -> dict[str, str]:
    """One colour per run that stays while the page is open: runs keep the colour they got first,
    new runs take the first colour no shown run holds."""
    colours = dict(assigned or {})
    for name in names:
        if name not in colours:
            used = set(colours.values())
            free = [c for c in PALETTE if c not in used]
            colours[name] = free[0] if free else PALETTE[len(colours) % len(PALETTE)]
    return colours


def data_regime(config: RunConfig | None) -> str:
    """What makes ε-losses comparable: the pixel range and the noise schedule (with its T)."""
    if config is None:
        return "unknown"
    return (f"pixels {PIXEL_RANGE_LABELS[config.train.pixel_range]} · {config.schedule.schedule} "
            f"T = {config.schedule.timesteps}")


def scaled_grid(images: np.ndarray, ncol: int | None = None, target_px: int = 420) -> np.ndarray:
    """A grid upscaled by whole pixels (nearest neighbour) to about `target_px` wide: crisp, not blurry."""
    grid = make_grid(images, ncol=ncol)
    scale = max(1, target_px // grid.shape[1])
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid  # (h, w) or (h, w, 3)


def upscale(image: np.ndarray, target_px: int) -> np.ndarray:
    """One uint8 (H, W) or (H, W, 3) image upscaled by whole pixels to about `target_px` wide."""
    scale = max(1, target_px // image.shape[1])
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image


def run_label(info: RunInfo) -> str:
    """Model + optimizer first (what the comparison is about), then the run's name."""
    if info.config is None:
        return f"{info.name} (unreadable)"
    return f"{recipe_label(info.config)} · {info.name}"


def epoch_position(df: pd.DataFrame, config: RunConfig | None) -> pd.Series:
    """Each row's place in epochs: 2.5 is half-way through the third epoch.

    metrics.csv logs whole epoch numbers; step / steps-per-epoch places rows inside their epoch. The
    steps per epoch follow from the config when the run trained on the dataset's training split; a
    run fed other images (the Python API) logs epochs that disagree, and keeps its whole numbers.
    """
    if config is None:
        return df["epoch"].astype(float)
    n_images = min(config.train.limit_images or TRAIN_SPLIT_SIZE, TRAIN_SPLIT_SIZE)
    fraction = df["step"] / steps_per_epoch(n_images, config.train.batch_size)
    consistent = bool((np.ceil(fraction - 1e-9).clip(lower=1) == df["epoch"]).all())
    return fraction if consistent else df["epoch"].astype(float)


def metrics_frame(named_rows: Iterable[tuple[RunInfo, list[dict[str, float]]]], weight: float) -> pd.DataFrame:
    """One long table of every run's metrics.csv rows, with the smoothed loss beside the raw one."""
    frames = []
    for info, rows in named_rows:
        if not rows:
            continue
        df = pd.DataFrame(rows)
        df.insert(0, "run", info.name)
        df.insert(1, "label", run_label(info))
        df["elapsed_min"] = df["elapsed_s"] / 60.0
        df["epoch_fraction"] = epoch_position(df, info.config)
        df["run_fraction"] = df["step"] / max(float(df["step"].max()), 1.0)
        df["regime"] = data_regime(info.config)
        df["loss_smoothed"] = smooth(df["loss"].to_numpy(), weight)
        frames.append(df)
    columns = ["run", "label", "regime", "step", "epoch", "epoch_fraction", "run_fraction", "loss", "loss_smoothed",
               "lr", "elapsed_s", "elapsed_min", "images_per_s"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


MARKERS = ("circle", "x", "triangle-up", "square")


def _near(a: np.ndarray, b: np.ndarray) -> bool:
    """Two curves that would hide one another: equal within NEAR_RTOL over their common length."""
    n = min(len(a), len(b))
    return n > 0 and bool(np.allclose(a[:n], b[:n], rtol=NEAR_RTOL, atol=0.0))


def loss_figure(df: pd.DataFrame, x_axis: str = "step", log_y: bool = True, show_raw: bool = True,
                height: int = 420, colours: dict[str, str] | None = None) -> go.Figure:
    """Overlaid loss curves, one colour per run (from `colours`, keyed by run name); the raw loss faint
    behind the smoothed line. A curve within NEAR_RTOL of one drawn before it (over their common steps)
    is dashed and marked, so neither hides the other; when the runs differ in pixel range or schedule,
    the legend says which is which."""
    x_col, x_title = X_AXES[x_axis]
    colours = assign_colours(df["run"].unique(), colours)
    mixed = "regime" in df.columns and df["regime"].nunique() > 1
    fig = go.Figure()
    drawn: list[np.ndarray] = []
    for run, part in df.groupby("run", sort=False):
        colour = colours[run]
        label = part["label"].iloc[0] + (f" [{part['regime'].iloc[0]}]" if mixed else "")
        values = part["loss_smoothed"].to_numpy()
        twins = sum(1 for other in drawn if _near(other, values))
        drawn.append(values)
        if show_raw:
            fig.add_trace(go.Scatter(x=part[x_col], y=part["loss"], mode="lines", name=f"{label} (raw)",
                                     line=dict(color=colour, width=1), opacity=0.25, showlegend=False,
                                     hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=part[x_col], y=values, mode="lines+markers" if twins else "lines",
                                 name=label,
                                 marker=dict(symbol=MARKERS[twins % len(MARKERS)], size=6,
                                             maxdisplayed=40),
                                 line=dict(color=colour, width=2, dash=DASHES[twins % len(DASHES)])))
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=x_title,
                      yaxis_title="loss (MSE of ε)", legend=dict(orientation="h", y=-0.2),
                      hovermode="x unified")
    if log_y:
        fig.update_yaxes(**LOG_AXIS)
    return fig


def live_loss_figure(steps: Sequence[int], losses: Sequence[float], height: int = 300) -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines+markers" if len(steps) < 40 else "lines",
                               line=dict(color=PALETTE[0], width=2), name="loss"))
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="step",
                      yaxis_title="loss (MSE of ε)")
    fig.update_yaxes(**LOG_AXIS)
    return fig


def schedule_figure(alpha_bars: np.ndarray, t: int, schedule: str) -> go.Figure:
    """ᾱ_t and SNR(t) = ᾱ_t / (1 − ᾱ_t) over t = 1..T, with a marker at the chosen t."""
    timesteps = np.arange(1, len(alpha_bars) + 1)
    snr = alpha_bars / (1 - alpha_bars)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ᾱ_t: how much of x₀ is left",
                                                         "SNR(t) = ᾱ_t / (1 − ᾱ_t), log scale"))
    fig.add_trace(go.Scatter(x=timesteps, y=alpha_bars, mode="lines", name=f"ᾱ_t ({schedule})",
                             line=dict(color=PALETTE[0])), row=1, col=1)
    fig.add_trace(go.Scatter(x=timesteps, y=snr, mode="lines", name=f"SNR ({schedule})",
                             line=dict(color=PALETTE[1])), row=1, col=2)
    for col, values in ((1, alpha_bars), (2, snr)):
        fig.add_trace(go.Scatter(x=[t], y=[values[t - 1]], mode="markers", marker=dict(size=11, color="black"),
                                 name=f"t = {t}", showlegend=False), row=1, col=col)
        fig.add_vline(x=t, line=dict(color="grey", dash="dot"), row=1, col=col)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=2)
    fig.update_xaxes(title_text="t")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    return fig


def bucket_figure(series: dict[str, list[tuple[int, int, float]]], timesteps: dict[str, int],
                  log_y: bool = True, colours: dict[str, str] | None = None,
                  y_title: str = "MSE of ε") -> go.Figure:
    """Loss per timestep bucket, one line per run; x is t when every run has the same T, else t/T."""
    same_t = len(set(timesteps.values())) <= 1
    colours = colours or {}
    fig = go.Figure()
    for i, (label, buckets) in enumerate(series.items()):
        total = timesteps[label]
        mids = [(lo + hi) / 2 for lo, hi, _ in buckets]
        fig.add_trace(go.Scatter(
            x=mids if same_t else [m / total for m in mids], y=[loss for _, _, loss in buckets],
            mode="lines+markers", name=label, line=dict(color=colours.get(label, PALETTE[i % len(PALETTE)]), width=2),
            text=[f"t in {lo}..{hi}" for lo, hi, _ in buckets], hovertemplate="%{text}: %{y:.4f}"))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title="t (bucket middle)" if same_t else "t / T (bucket middle)",
                      yaxis_title=y_title, legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(**LOG_AXIS)
    return fig


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


def _display(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def config_diff(configs: dict[str, RunConfig]) -> pd.DataFrame:
    """Only the config fields whose values differ between the runs; one column per run."""
    flat = {}
    for name, config in configs.items():
        row: dict[str, Any] = {}
        _flatten("", {k: v for k, v in config.to_dict().items() if k != "format_version"}, row)
        for unused in UNUSED_MODEL_FIELDS.get(config.model.name, ()):
            row[f"model.{unused}"] = "not used"  # e.g. attention of the book's UNet
        flat[name] = {k: _display(v) for k, v in row.items()}
    fields = sorted({k for row in flat.values() for k in row})
    differing = [f for f in fields if len({row.get(f, "—") for row in flat.values()}) > 1]
    return pd.DataFrame({name: [row.get(f, "—") for f in differing] for name, row in flat.items()},
                        index=pd.Index(differing, name="setting"))


# The headline figures of an evaluation first (QualityReport.to_dict's names); whatever else an
# entry holds follows, and the per-class shares come last.
EVAL_FIRST = ("run", "setting", "n", "fd", "fd_floor", "fd_ratio", "fd_noise", "class_entropy", "mean_confidence")


def evals_frame(named_evals: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """Every eval.json entry of every run as one row; nested dicts become dotted columns."""
    rows = []
    for name, entries in named_evals.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # a hand-edited eval.json: show what can be shown
            row: dict[str, Any] = {"run": name}
            _flatten("", entry, row)
            rows.append({k: (v if isinstance(v, (int, float, str)) or v is None else _display(v))
                         for k, v in row.items()})
    df = pd.DataFrame(rows)
    first = [c for c in EVAL_FIRST if c in df.columns]
    shares = [c for c in df.columns if c.startswith("class_shares.")]
    return df[first + [c for c in df.columns if c not in first and c not in shares] + shares]


def class_shares_figure(named_evals: dict[str, list[dict[str, Any]]]) -> go.Figure | None:
    """The share of each predicted class in the samples: one heatmap row per evaluation (run · setting),
    one column per class, the share written in each cell. None if no entry has shares."""
    rows, names = [], []
    for name, entries in named_evals.items():
        for entry in entries:
            shares = entry.get("class_shares") if isinstance(entry, dict) else None
            if isinstance(shares, dict) and shares:
                rows.append(shares)
                names.append(f"{name} · {entry.get('setting', '')}".rstrip(" ·"))
    if not rows:
        return None
    classes = list(dict.fromkeys(c for r in rows for c in r))
    z = [[r.get(c) if isinstance(r.get(c), (int, float)) else None for c in classes] for r in rows]
    fig = go.Figure(go.Heatmap(z=z, x=classes, y=names, colorscale="Blues", zmin=0, zmax=max(0.3, max(
        (v for row in z for v in row if v is not None), default=0.3)), text=[[f"{v:.0%}" if v is not None else ""
                                                                              for v in row] for row in z],
        texttemplate="%{text}", hovertemplate="%{y}<br>%{x}: %{z:.1%}<extra></extra>",
        colorbar=dict(title="share", tickformat=".0%")))
    fig.update_layout(height=120 + 26 * len(rows), margin=dict(l=10, r=10, t=10, b=10),
                      yaxis=dict(autorange="reversed"), xaxis=dict(side="top"))
    return fig


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def quality_groups(named_evals: dict[str, list[dict[str, Any]]]) -> dict[tuple[Any, Any], dict[str, list[dict]]]:
    """Eval entries that may share one chart: the same sample count N and the same classifier.

    {(n, classifier_sha256): {run: [entries with an fd]}}, the group of the latest evaluation first."""
    groups: dict[tuple[Any, Any], dict[str, list[dict]]] = {}
    for run, entries in named_evals.items():
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("fd"), (int, float)) and entry.get("sampler"):
                key = (entry.get("n"), entry.get("classifier_sha256"))
                groups.setdefault(key, {}).setdefault(run, []).append(entry)
    def latest(item) -> str:
        return max(str(e.get("finished_at") or "") for entries in item[1].values() for e in entries)

    return dict(sorted(groups.items(), key=lambda item: (latest(item), sum(len(v) for v in item[1].values())),
                       reverse=True))


def _nfe(entry: dict[str, Any]) -> float | None:
    value = entry.get("nfe") if entry.get("nfe") is not None else entry.get("steps")
    return float(value) if isinstance(value, (int, float)) else None


def steps_quality_figure(runs_entries: dict[str, list[dict[str, Any]]], colours: dict[str, str] | None = None,
                         height: int = 380, elsewhere: dict[str, dict[str, Any]] | None = None) -> go.Figure:
    """Fréchet distance against network evaluations per image: one line per (run, sampler), one
    colour per run, one dash per sampler; each run's DDPM figure as a dashed horizontal line.
    `elsewhere`: a run's DDPM entry taken with another classifier or N, drawn dotted and labelled as
    such (the book's DDPM line stays in sight, and no one reads it as on this scale)."""
    colours = assign_colours(runs_entries, colours)
    samplers = [s for s in SAMPLER_LABELS if s != "ddpm"]
    fig = go.Figure()
    for run, entries in runs_entries.items():
        for sampler in samplers:
            points = sorted((_nfe(e), e["fd"], e.get("setting", "")) for e in entries
                            if e.get("sampler") == sampler and _nfe(e) is not None)
            if points:
                fig.add_trace(go.Scatter(
                    x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                    name=f"{run} · {SAMPLER_LABELS[sampler]}", text=[p[2] for p in points],
                    hovertemplate="%{text}: FD %{y:.2f} at %{x:.0f} NFE",
                    line=dict(color=colours[run], width=2, dash=DASHES[samplers.index(sampler) % len(DASHES)])))
        ddpm = [e for e in entries if e.get("sampler") == "ddpm"]
        if ddpm:
            best = min(ddpm, key=lambda e: e["fd"])
            fig.add_hline(y=best["fd"], line=dict(color=colours[run], dash="dash", width=1),
                          annotation_text=f"{run} · DDPM {best.get('steps', '')}: {best['fd']:.2f}",
                          annotation_position="top left")
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{run} · DDPM (all T steps)",
                                     line=dict(color=colours[run], dash="dash", width=1)))
    for run, entry in (elsewhere or {}).items():
        colour = colours.get(run) or assign_colours([run])[run]
        fig.add_hline(y=entry["fd"], line=dict(color=colour, dash="dot", width=1),
                      annotation_text=f"{run} · DDPM {entry.get('steps', '')}: {entry['fd']:.2f}, other classifier "
                                      f"{str(entry.get('classifier_sha256') or '?')[:6]}, N = {entry.get('n')} "
                                      "(not on this scale)", annotation_position="bottom left")
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title="network evaluations per image (NFE)", yaxis_title="Fréchet distance (lower is better)",
                      legend=dict(orientation="h", y=-0.25), showlegend=True)
    fig.update_xaxes(**LOG_AXIS)
    return fig


ETA_WINDOW_S = 60.0


def smoothed_eta(history: list[tuple[float, int]], total_steps: int, time_left_s: float | None) -> float | None:
    """Seconds left from the pace over the last minute of (elapsed_s, step) readings, not the last
    few steps (which jump with every load burst); bounded by a time budget's remainder."""
    candidates = [] if time_left_s is None else [max(0.0, time_left_s)]
    if total_steps and len(history) >= 2:
        now_s, now_step = history[-1]
        then_s, then_step = next(((s, k) for s, k in history if now_s - s <= ETA_WINDOW_S), history[0])
        if (then_s, then_step) == history[-1]:
            then_s, then_step = history[-2]
        if now_s > then_s and now_step > then_step:
            candidates.append((total_steps - now_step) * (now_s - then_s) / (now_step - then_step))
    return min(candidates) if candidates else None


def steady_images_per_s(history: list[tuple[float, int]], batch: int) -> float | None:
    """Images per second over the last minute of (elapsed_s, step) readings: one reading's pace swings
    with every load burst (16 to 700 images/s on a shared machine), a minute's does not."""
    if len(history) < 2:
        return None
    now_s, now_step = history[-1]
    then_s, then_step = next(((s, k) for s, k in history if now_s - s <= ETA_WINDOW_S), history[0])
    if (then_s, then_step) == history[-1]:
        then_s, then_step = history[-2]
    if now_s <= then_s or now_step <= then_step:
        return None
    return (now_step - then_step) * batch / (now_s - then_s)


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def plain_number(value: float, digits: int = 2) -> str:
    """Numbers people read: 0.25, 1,000, 5.6 × 10⁻¹¹ (never 5.6e-11 or "1e + 04")."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1:
        return f"{value:.{digits}g}"
    if 1 <= abs(value) < 1e7:
        decimals = max(0, 3 - int(math.log10(abs(value))))
        text = f"{value:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if decimals else text
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{float(mantissa):g} × 10{str(int(exponent)).translate(SUPERSCRIPT)}"


def sweep_fd_figure(rows: Sequence[dict[str, Any]], height: int = 380) -> go.Figure | None:
    """Fréchet distance per run of a sweep, in the sweep's order, each bar labelled with the change
    it made (a path's step, or a grid cell's factors), the floor (real images against the test split)
    dashed. None when no run has a score yet."""
    scored = [r for r in rows if r.get("fd") is not None]
    if not scored:
        return None
    labels = [f"{i + 1}. {r['label']}" for i, r in enumerate(rows) if r.get("fd") is not None]
    text = [f"{r['fd']:.1f}" + (f" ({r['fd_ratio']:.1f}×)" if r.get("fd_ratio") is not None else "")
            + (f"<br>{r['verdict']}" if r.get("verdict") else "") for r in scored]
    fig = go.Figure(go.Bar(x=labels, y=[r["fd"] for r in scored], text=text, textposition="outside",
                           marker_color=PALETTE[0], hovertext=[r["run"] for r in scored]))
    floors = [r["floor"] for r in scored if r.get("floor") is not None]
    if floors:
        fig.add_hline(y=floors[0], line_dash="dash", line_color=PALETTE[2],
                      annotation_text=f"floor {floors[0]:.2f}<br>(real images)", annotation_position="right",
                      annotation_xanchor="left")  # in the right margin: over no bar, whatever the data
    n = scored[0].get("n")
    fig.update_layout(height=height, margin=dict(l=10, r=110, t=30, b=10), showlegend=False,
                      yaxis_title=f"Fréchet distance, N = {n} (lower is better)", xaxis_tickangle=-20)
    return fig
