"""Forward process: watch noise swallow a dataset image as t grows, and see ᾱ_t and SNR at that t.

Needs no trained run: only the dataset (a built-in one, or a run's own images) and the noise schedule.
"""
from __future__ import annotations

import math
import random

import streamlit as st

from core.config import SCHEDULE_NAMES, ConfigError
from core.data.datasets import DatasetNotFoundError
from core.store import runs
from dashboard import cache, data_source
from dashboard.state import runs_dir
from dashboard.charts import plain_number, schedule_figure, upscale

PIXEL_RANGES = {"symmetric": "[−1, 1] (ImprovedUNet presets)", "unit": "[0, 1] (the book)"}
GREY_MAPPING = {"symmetric": "Grey levels: −1 is black, 0 mid-grey, +1 white; values outside [−1, 1] are clipped.",
                "unit": "Grey levels: 0 is black, 1 white; x_t leaves [0, 1] (ε has unit variance), and "
                        "everything below 0 shows black and above 1 white, so x_t looks saturated."}
NOISE_ENOUGH = 1e-3  # ᾱ_T above this: x_T still holds a visible trace of x_0


def _random_index(n_images: int) -> None:
    """Another image than the one shown (a random draw may repeat it)."""
    current = st.session_state.get("fw_index", 0)
    st.session_state["fw_index"] = (current + random.randrange(1, n_images)) % n_images


def latex_number(value: float) -> str:
    """4.036e-05 as 4.036 \times 10^{-5}: plain digits, no "e − 05"."""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return rf"{float(mantissa):.4g} \times 10^{{{int(exponent)}}}"


def source_ui(installed: tuple[str, ...]) -> tuple[str, str, int, str, bool]:
    """Dataset (of those installed), schedule, T, pixel range and whether the linear betas scale with T."""
    c1, c2, c3, c4, c5 = st.columns([2, 2, 2, 3, 2])
    offered = data_source.forward_sources(runs.list_runs(runs_dir()), installed)
    if st.session_state.get("fw_dataset") not in offered:  # a deleted run or dataset: back to the first one
        st.session_state.pop("fw_dataset", None)
    dataset = c1.selectbox("Dataset", list(offered), format_func=offered.get, key="fw_dataset",
                           persist_state="session", help="a dataset installed on this machine, or the images a "
                           "run trained on (its own folder, at its size and channels)")
    schedule = c2.radio("Schedule", SCHEDULE_NAMES, horizontal=True, key="fw_schedule", persist_state="session",
                        help="linear: the book (Ho et al. 2020); cosine: Nichol & Dhariwal 2021")
    timesteps = int(c3.number_input("T (timesteps)", min_value=2, max_value=4000, value=1000, step=50,
                                    key="fw_T", persist_state="session"))
    pixel_range = c4.radio("Pixel range", list(PIXEL_RANGES), format_func=PIXEL_RANGES.get, key="fw_range",
                           persist_state="session")
    scale = c5.toggle("β × 1000/T", value=True, key="fw_scale", persist_state="session",
                      help="The book's linear betas (1e-4 to 0.02) are for T = 1000; scaled by 1000/T, x_T is "
                           "noise for any T (improved-diffusion). Off: the book's betas at any T.")
    return dataset, schedule, timesteps, pixel_range, scale


def image_ui(n_images: int) -> tuple[int, int]:
    """Which image, and the seed of its noise ε."""
    c1, c2, c3 = st.columns([2, 1, 2], vertical_alignment="bottom")
    st.session_state.setdefault("fw_index", 0)
    index = int(c1.number_input(f"Image index (0 to {n_images - 1})", min_value=0, max_value=n_images - 1,
                                key="fw_index", persist_state="session"))
    c2.button("Random image", icon=":material/casino:", on_click=_random_index, args=(n_images,), key="fw_random")
    seed = int(c3.number_input("Noise seed", min_value=0, max_value=2**31 - 1, value=0, key="fw_seed",
                               persist_state="session"))
    return index, seed


def timestep_ui(timesteps: int) -> int:
    st.session_state.setdefault("fw_t", max(1, timesteps // 10))
    if st.session_state["fw_t"] > timesteps:  # T was lowered below the slider's value
        st.session_state["fw_t"] = timesteps
    return int(st.slider("Timestep t", min_value=1, max_value=timesteps, key="fw_t", persist_state="session"))


st.title("Forward process")
st.caption("The forward process adds Gaussian noise to a real image: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. "
           "Drag t to see how much of the image survives; no trained model is needed here.")

installed = data_source.installed_datasets()
if not installed:
    st.error("No dataset is installed on this machine, so there is no image to add noise to. Ask whoever runs "
             "this server to run `make data` (it installs FashionMNIST), then reload this page.")
    st.stop()
dataset_name, schedule, T, pixel_range, scale = source_ui(installed)
try:
    n_images = len(data_source.source_images(dataset_name))
except (DatasetNotFoundError, ConfigError, runs.RunError) as exc:
    st.error(str(exc))
    st.stop()

index, noise_seed = image_ui(n_images)
t = timestep_ui(T)
example = cache.forward_example(dataset_name, index, T, schedule, pixel_range, noise_seed, scale)
alpha_bar = float(example["alpha_bars"][t - 1])
snr = alpha_bar / (1 - alpha_bar)

left, mid, right = st.columns([1, 1, 2])
with left:
    st.image(upscale(example["x0"], 168), caption=f"x₀ (image {index})")
with mid:
    st.image(upscale(example["noise"], 168), caption="ε ~ N(0, I)")
with right:
    st.image(upscale(example["xt"][t - 1], 336), caption=f"x_t at t = {t}")

# Two short lines, so the formula fits a narrow window even at t = 1000 (the SNR stays visible).
st.latex(rf"x_{{{t}}} = \sqrt{{\bar\alpha_{{{t}}}}}\,x_0 + \sqrt{{1-\bar\alpha_{{{t}}}}}\,\epsilon"
         rf" = {math.sqrt(alpha_bar):.4f}\,x_0 + {math.sqrt(1 - alpha_bar):.4f}\,\epsilon")
st.latex(rf"\bar\alpha_{{{t}}} = \prod_{{s=1}}^{{{t}}} (1-\beta_s) = {latex_number(alpha_bar)},"
         rf"\qquad \mathrm{{SNR}}({t}) = \frac{{\bar\alpha_{{{t}}}}}{{1-\bar\alpha_{{{t}}}}} = {latex_number(snr)}")
st.caption(GREY_MAPPING[pixel_range])
alpha_bar_T = float(example["alpha_bars"][-1])
if alpha_bar_T > NOISE_ENOUGH:
    st.warning(f"ᾱ_T = {plain_number(alpha_bar_T)} at T = {T}: x_T still holds {plain_number(math.sqrt(alpha_bar_T))} "
               "of x₀, so "
               "sampling from pure noise starts somewhere the model never trained. Scale the betas with T, "
               "raise T, or use the cosine schedule.", icon=":material/warning:")
else:
    st.caption(f"ᾱ_T = {plain_number(alpha_bar_T)} at T = {T}: x_T is pure noise, as sampling assumes.")

st.plotly_chart(schedule_figure(example["alpha_bars"], t, schedule), key="fw_schedule_chart")

st.subheader("x_t at evenly spaced t")
st.caption("The same image and the same ε at ten timesteps, like the book's figure of the forward process.")
strip_t = cache.strip_timesteps(T)
st.image([upscale(example["xt"][s - 1], 84) for s in strip_t], caption=[f"t = {s}" for s in strip_t])
