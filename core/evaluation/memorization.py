"""Did the model learn the images or copy them? For each sample, its nearest training image.

Diffusion models copy small training sets (Somepalli et al. 2023, "Diffusion Art or Digital
Forgery?"; Carlini et al. 2023, "Extracting Training Data from Diffusion Models"), and no Fréchet
distance shows it: a model that replays its 8 training images scores like a perfect one. So:

  distance   the root-mean-square pixel difference to the nearest training image, pixels in [0, 1]
             (the L2 distance / sqrt(C·H·W): 0 = identical, comparable across image sizes); also in
             the classifier's 128-d features where the data has one;
  reference  the same distances for held-out real images (never trained on): what "new images from
             the same distribution" look like. Samples much closer than those are suspicious;
  criterion  a sample is a NEAR-COPY when its nearest training image is much closer than the next
             ones: d_1 < RATIO_THRESHOLD · mean(d_2 … d_{k+1}), k = min(50, training images − 1).
             This is Carlini et al.'s relative criterion (nearest distance over the mean distance of
             the next n = 50 neighbours), with our threshold 1/3.
Why relative, not a fixed distance: a fixed threshold depends on the data (a plain background makes
every image close to every other); the ratio asks "is this one training image special to it", which
a copy satisfies (d_1 ≈ 0) and a new image does not (its neighbours are all about equally far). The
held-out images measure the criterion's false-positive rate on the same data; the report gives both
shares, and `copying` is true when at least COPYING_SHARE of the samples are near-copies and more
than of the held-out images.

The search is exact and memory-bounded: training images are read in chunks of REFERENCE_CHUNK,
converted to float per chunk (the uint8 set is never copied whole into floats), distances come from
one matmul per chunk (|q|² + |r|² − 2 q·r, float32) keeping the best k + RERANK_MARGIN per query,
and those candidates are re-ranked with exact float64 differences; so the neighbours and distances
match a brute-force float64 search (a test checks it against torch.cdist).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from ..config import ConfigError
from .pixels import as_nchw

NEIGHBOURS = 50            # Carlini et al.'s n: the mean of the next n nearest is the scale
RATIO_THRESHOLD = 1 / 3    # d_1 below a third of the next ones' mean: one training image is special
COPYING_SHARE = 0.1        # verdict: a tenth of the samples near-copies (and more than held-out images)
REFERENCE_CHUNK = 4096     # training images per matmul block
QUERY_CHUNK = 1024         # samples per block: a block of distances is QUERY_CHUNK x REFERENCE_CHUNK floats
RERANK_MARGIN = 8          # float32 candidates beyond k, re-ranked exactly in float64
EXACT_BLOCK_DOUBLES = 8 * 2**20
GRID_PAIRS = 16

FeatureFn = Callable[[torch.Tensor], torch.Tensor]   # uint8 (N, C, H, W) -> float (N, D)


def _identity(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.to(dtype)


def _flat(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C·H·W) in [0, 1]."""
    return images.reshape(len(images), -1).to(dtype) / 255.0


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, k: int,
                       to_vectors: Callable[..., torch.Tensor] = _flat) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of `reference` for every row of `queries` in L2: float64 distances (M, k),
    ascending, and their int64 indices. Both sets pass through `to_vectors(x, dtype)` chunk by chunk."""
    m, n = len(queries), len(reference)
    if m < 1 or n < 1:
        raise ConfigError(f"images = {m} queries, {n} reference is not allowed: both need at least one image")
    k = min(k, n)
    keep = min(k + RERANK_MARGIN, n)
    out_d, out_i = [], []
    for q0 in range(0, m, QUERY_CHUNK):
        q = to_vectors(queries[q0:q0 + QUERY_CHUNK])
        q_sq = q.square().sum(1, keepdim=True)
        best_d = torch.empty((len(q), 0))
        best_i = torch.empty((len(q), 0), dtype=torch.int64)
        for r0 in range(0, n, REFERENCE_CHUNK):
            r = to_vectors(reference[r0:r0 + REFERENCE_CHUNK])
            d = (q_sq + r.square().sum(1)[None, :] - 2.0 * (q @ r.T)).clamp_min(0)
            idx = torch.arange(r0, r0 + len(r)).expand(len(q), -1)
            best_d, pick = torch.cat([best_d, d], 1).topk(min(keep, best_d.shape[1] + len(r)), 1, largest=False)
            best_i = torch.cat([best_i, idx], 1).gather(1, pick)
        exact = _exact_distances(to_vectors(queries[q0:q0 + QUERY_CHUNK], torch.float64), reference, best_i, to_vectors)
        exact, order = exact.sort(1)
        out_d.append(exact[:, :k])
        out_i.append(best_i.gather(1, order)[:, :k])
    return torch.cat(out_d), torch.cat(out_i)


def _exact_distances(q: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor,
                     to_vectors: Callable[..., torch.Tensor]) -> torch.Tensor:
    """float64 L2 distances from each query to its candidates, from differences (no cancellation)."""
    rows = []
    step = max(1, EXACT_BLOCK_DOUBLES // (candidates.shape[1] * q.shape[1]))  # bounded: ~64 MB of doubles
    for s in range(0, len(q), step):
        cand = candidates[s:s + step]
        vectors = to_vectors(reference[cand.reshape(-1)], torch.float64).reshape(*cand.shape, -1)
        rows.append((vectors - q[s:s + step][:, None, :]).square().sum(-1).sqrt())
    return torch.cat(rows)


def copy_ratios(distances: torch.Tensor) -> torch.Tensor:
    """d_1 / mean(d_2 … d_{k+1}) per row of ascending distances (M, k+1). A row of zeros (the sample
    equals several identical training images) counts as a copy: ratio 0."""
    if distances.shape[1] < 2:
        raise ConfigError("training images = 1 is not allowed: a near-copy is judged against the next nearest "
                          "training images, so the check needs at least 2")
    rest = distances[:, 1:].mean(1)
    return torch.where(rest > 0, distances[:, 0] / rest.clamp_min(1e-12), torch.zeros_like(rest))


@dataclass
class SpaceReport:
    """Nearest-training-image distances of the samples and of held-out real images, in one space."""
    space: str                      # "pixels" or "features"
    sample_distance: torch.Tensor   # (M,) nearest distance per sample
    sample_ratio: torch.Tensor      # (M,) d_1 / mean of the next k
    heldout_distance: torch.Tensor  # (H,)
    heldout_ratio: torch.Tensor

    @property
    def near_copy_share(self) -> float:
        return float((self.sample_ratio < RATIO_THRESHOLD).double().mean())

    @property
    def heldout_near_copy_share(self) -> float:
        return float((self.heldout_ratio < RATIO_THRESHOLD).double().mean())

    def to_dict(self) -> dict[str, float]:
        p = self.space
        out = {f"{p}_near_copy_share": self.near_copy_share,
               f"{p}_heldout_near_copy_share": self.heldout_near_copy_share}
        for who, d, r in (("sample", self.sample_distance, self.sample_ratio),
                          ("heldout", self.heldout_distance, self.heldout_ratio)):
            q = torch.quantile(d.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
            out.update({f"{p}_{who}_nearest_min": float(d.min()), f"{p}_{who}_nearest_p5": float(q[0]),
                        f"{p}_{who}_nearest_median": float(q[1]), f"{p}_{who}_nearest_p95": float(q[2]),
                        f"{p}_{who}_ratio_median": float(r.double().median())})
        return {k: round(v, 6) for k, v in out.items() if math.isfinite(v)}


@dataclass
class MemorizationReport:
    """What `check` found; `to_dict` holds finite numbers only (what eval.json stores)."""
    n_samples: int
    n_train: int
    n_heldout: int
    neighbours: int
    pixels: SpaceReport
    nearest_index: torch.Tensor          # (M,) nearest training image of each sample, in pixels
    features: SpaceReport | None = None

    @property
    def near_copy_share(self) -> float:
        return self.pixels.near_copy_share

    @property
    def copying(self) -> bool:
        return self.near_copy_share >= COPYING_SHARE and self.near_copy_share > self.pixels.heldout_near_copy_share

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n_samples, "train_images": self.n_train, "heldout_images": self.n_heldout,
            "criterion": f"d1 < {RATIO_THRESHOLD:.4f} * mean(d2..d{self.neighbours + 1}), pixel RMS distance",
            "near_copy_share": round(self.near_copy_share, 6), "copying": self.copying,
            **self.pixels.to_dict()}
        if self.features is not None:
            out.update(self.features.to_dict())
        return out


def _space(space: str, samples, train, heldout, k: int, to_vectors, scale: float,
           skip: int = 0) -> tuple[SpaceReport, torch.Tensor]:
    """`skip` = 1 drops each held-out image's nearest match: itself, when it is a training image."""
    sd, si = nearest_neighbours(samples, train, k + 1, to_vectors)
    hd, _ = nearest_neighbours(heldout, train, k + 1 + skip, to_vectors)
    hd = hd[:, skip:]
    report = SpaceReport(space, sd[:, 0] / scale, copy_ratios(sd), hd[:, 0] / scale, copy_ratios(hd))
    return report, si[:, 0]


def check(samples, train, heldout, features: FeatureFn | None = None, *,
          heldout_in_train: bool = False) -> MemorizationReport:
    """Nearest training image of every sample and of every held-out real image, in pixels (and in
    `features`, e.g. a classifier's, when given). All three are uint8 (N, [C,] H, W) of one shape.
    `heldout_in_train`: the held-out images are themselves training images (an image folder holds
    nothing out), so each one's own match is skipped: its nearest *other* training image counts."""
    samples, train, heldout = (as_nchw(x, what) for x, what in
                               ((samples, "samples"), (train, "training images"), (heldout, "held-out images")))
    shape = tuple(samples.shape[1:])
    for what, x in (("training images", train), ("held-out images", heldout)):
        if tuple(x.shape[1:]) != shape:
            raise ConfigError(f"{what} shape = {tuple(x.shape[1:])} is not allowed: the samples are {shape}")
    least = 3 if heldout_in_train else 2
    if len(train) < least:
        raise ConfigError(f"training images = {len(train)} is not allowed: the check needs at least {least}")
    k = min(NEIGHBOURS, len(train) - least + 1)
    skip = int(heldout_in_train)
    pixels, index = _space("pixels", samples, train, heldout, k, _flat, math.sqrt(math.prod(shape)), skip)
    feature_report = None
    if features is not None:  # embedded once (N x 128 floats), then searched like pixels
        vectors = [_embed(features, x) for x in (samples, train, heldout)]
        feature_report, _ = _space("features", *vectors, k, _identity, 1.0, skip)
    return MemorizationReport(len(samples), len(train), len(heldout), k, pixels, index, feature_report)


def _embed(features: FeatureFn, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([features(images[s:s + batch]).float().cpu() for s in range(0, len(images), batch)])


def pairs_grid_png(samples, train, report: MemorizationReport, pairs: int = GRID_PAIRS, per_row: int = 4,
                   scale: int = 3) -> bytes:
    """PNG: "sample | its nearest training image" pairs, most copy-like first (lowest ratio), per_row
    pairs a row, a wider gap between pairs than inside one."""
    samples, train = as_nchw(samples), as_nchw(train)
    order = report.pixels.sample_ratio.argsort()[:pairs]
    channels, h, w = samples.shape[1:]
    gap = max(2, w // 8)
    tiles = []
    for i in order.tolist():
        pair = torch.cat([samples[i], torch.full((channels, h, 1), 255, dtype=torch.uint8),
                          train[int(report.nearest_index[i])]], dim=2)   # a white line between the two
        tiles.append(pair)
    grid = make_grid(torch.stack(tiles), nrow=per_row, padding=gap, pad_value=0)  # (3, H', W') uint8
    array = grid.permute(1, 2, 0).numpy() if channels == 3 else grid[0].numpy()
    if scale > 1:
        array = np.kron(array, np.ones((scale, scale, 1) if channels == 3 else (scale, scale), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB" if channels == 3 else "L").save(buf, format="PNG")
    return buf.getvalue()
