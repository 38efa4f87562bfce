"""Reverse process: generate images with a trained run, then scrub (or play) every step of the way.

Generation runs in a background `SamplingJob`; a fragment polls its progress, so the page stays
responsive during a 1000-step DDPM. Every step's x_t and predicted x̂0 are kept for the scrubber.
"""
from __future__ import annotations

import math
from pathlib import Path

import streamlit as st
import torch

from core.store import runs
from core.config import (DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, SAMPLER_LABELS, SAMPLER_NAMES, ConfigError,
                         SampleConfig)
from core.store.export import frames_npz, grid_png, reverse_gif
from core.work import estimates
from core.work.jobs import SamplingJob
from dashboard import cache, guidance
from dashboard.charts import format_duration, scaled_grid
from dashboard.state import runs_dir
from dashboard.widgets import run_picker_ui, sampleable

MAX_IMAGES = 64          # 1000 DDPM frames x 64 images x 2 (x_t, x̂0) = 100 MB of uint8: the ceiling
POLL_S = 0.3
PLAY_TICK_S = 0.15
PLAY_TICKS = 60          # a playthrough takes about PLAY_TICKS ticks, whatever the number of frames
SAMPLER_HELP = {"ddpm": "all T steps", "ddim": "few steps", "dpmpp2m": "few steps, 2nd order",
                "dpmpp2m-sde": "few steps, 2nd order, stochastic"}


# -- callbacks -------------------------------------------------------------------------------------------
def _generate(run_dir: str) -> None:
    # The settings as they are at the click, not as the last completed rerun drew them: a click that
    # interrupts the rerun of a class or count change would otherwise generate the old setting.
    params = current_params(runs.run_info(Path(run_dir)))
    previous = st.session_state.get("rev_job")
    if previous is not None:
        previous["job"].cancel()
    try:
        loaded = cache.load_run_model(Path(run_dir), use_ema=params["use_ema"])
        config = SampleConfig(sampler=params["sampler"], steps=params["steps"], eta=params["eta"],
                              n=params["n"], seed=params["seed"])
        config.resolved_steps(loaded.config.schedule.timesteps)  # a bad value fails here, not in the thread
    except (ConfigError, runs.RunError) as exc:
        st.session_state["rev_feedback"] = ("error", f"Not generated: {exc}")
        return
    labels = torch.tensor(params["labels"]) if params.get("labels") else None  # conditional runs (step 10)
    job = SamplingJob(loaded.model, cache.scheduler_for(loaded.config), config,
                      pixel_range=loaded.config.train.pixel_range, clip_default=loaded.config.train.clip_denoised,
                      record="all", device=cache.DEVICE, labels=labels, guidance=params.get("guidance", 1.0),
                      prediction=loaded.config.train.prediction, shape=loaded.config.data.shape,
                      timing=(runs_dir(), estimates.network_key(loaded.config.model, loaded.config.data.shape))).start()
    meta = dict(params, run=loaded.name, used_ema=loaded.used_ema, timesteps=loaded.config.schedule.timesteps,
                dataset=loaded.config.data.dataset, class_names=list(loaded.config.data.names))
    st.session_state["rev_job"] = {"job": job, "meta": meta}


def status_frames(job: SamplingJob) -> int:
    return len(job.result.frame_timesteps) if job.result is not None else 0


def running_job():
    """(entry, status) of the generation in progress, or (entry, None) when there is none running."""
    entry = st.session_state.get("rev_job")
    if entry is None:
        return None, None
    status = entry["job"].snapshot()
    return entry, (status if status.state == "running" else None)


def _collect_finished() -> None:
    """Move a finished generation's result into the page state (once)."""
    entry, running = running_job()
    if entry is None or running is not None:
        return
    status = entry["job"].snapshot()
    del st.session_state["rev_job"]
    if status.state == "finished":
        st.session_state["rev_result"] = {"result": entry["job"].result, "meta": entry["meta"],
                                          "elapsed_s": status.elapsed_s}
        st.session_state["rev_frame"] = status_frames(entry["job"])  # open on the finished images
        st.session_state["rev_playing"] = False
    elif status.state == "failed":
        st.session_state["rev_feedback"] = ("error", f"Generation failed: {status.error}")
    else:
        st.session_state["rev_feedback"] = ("info", "Generation cancelled.")


# -- per-run settings --------------------------------------------------------------------------------------
# Sampler, steps, η and EMA belong to a run (a T = 20 run and a T = 1000 run want different steps, and
# only some runs have EMA weights); seed and image count are the user's, whatever the run.
PER_RUN_KEYS = ("rev_sampler", "rev_steps", "rev_eta", "rev_ema")


def run_defaults(info: runs.RunInfo) -> dict:
    """What a run opens with: the best few-step setting, and EMA weights where the run has them."""
    T = info.config.schedule.timesteps
    return {"rev_sampler": DEFAULT_FEW_STEP_SAMPLER, "rev_steps": min(DEFAULT_FEW_STEPS, T), "rev_eta": 0.0,
            "rev_ema": (info.path / "ema.safetensors").exists()}


def switch_run_settings(info: runs.RunInfo) -> None:
    """Keep the widgets' values for the run they were set on; bring in this run's own (or its defaults).

    Runs before the sampler widgets are drawn, so it may set their values."""
    state = st.session_state
    saved = state.setdefault("rev_per_run", {})
    if state.get("rev_settings_for") == info.name and all(key in state for key in PER_RUN_KEYS):
        return  # the widgets already hold this run's values (they are dropped when the user leaves the page)
    values = dict(run_defaults(info), **saved.get(info.name, {}))
    values["rev_steps"] = min(int(values["rev_steps"]), info.config.schedule.timesteps)
    if not (info.path / "ema.safetensors").exists():
        values["rev_ema"] = False
    for key, value in values.items():
        state[key] = value
    # "rev_settings_for" is set only once the widgets have been drawn with these values (sampler_ui):
    # a rerun that cuts this one short (a click on another field, on a loaded machine) arrives with the
    # previous run's widget values from the browser, and must bring this run's in again.


# -- widgets ---------------------------------------------------------------------------------------------
def sampler_ui(info: runs.RunInfo, top: list) -> dict:
    """Sampler settings for this run, as a plain dict: sampler, steps and η in the `top` row's
    columns, seed, count and EMA in a second row whose last columns hold Generate (returned too)."""
    T = info.config.schedule.timesteps
    has_ema = (info.path / "ema.safetensors").exists()
    switch_run_settings(info)
    sampler = top[0].selectbox("Sampler", SAMPLER_NAMES, key="rev_sampler", format_func=SAMPLER_LABELS.get,
                               help="; ".join(f"{SAMPLER_LABELS[k]}: {v}" for k, v in SAMPLER_HELP.items())
                               + f". Default: {SAMPLER_LABELS[DEFAULT_FEW_STEP_SAMPLER]}, {DEFAULT_FEW_STEPS} "
                               "steps (the best few-step setting measured so far); DDPM is the book's, every step.")
    few_steps = sampler != "ddpm"
    ddim = sampler == "ddim"
    steps = top[1].number_input(f"Steps (1 to T = {T})", min_value=1, max_value=T, key="rev_steps",
                                disabled=not few_steps,
                                help="DDPM always runs all T steps; the other samplers can skip.")
    eta = top[2].slider("η", 0.0, 1.0, step=0.1, key="rev_eta", disabled=not ddim,
                        help="DDIM noise: 0 deterministic, 1 like DDPM")
    c4, c5, c6, c7, c8 = st.columns([1, 1, 1, 1.2, 3.8], vertical_alignment="bottom")
    seed = c4.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="rev_seed",
                           persist_state="session")
    n = c5.number_input("Images", min_value=1, max_value=MAX_IMAGES, value=16, key="rev_n", persist_state="session",
                        disabled=info.config.model.conditional  # drawn before the class picker: its default
                        and st.session_state.get("rev_class", guidance.ALL_CLASSES) == guidance.ALL_CLASSES,
                        help="For one row per class, the count is 10 × Images per class (below).")
    use_ema = c6.toggle("EMA", disabled=not has_ema, key="rev_ema",
                        help="Sample with the EMA weights (usually better)" if has_ema
                        else "This run was trained without EMA")
    st.session_state["rev_per_run"][info.name] = {"rev_sampler": sampler, "rev_steps": int(steps),
                                                  "rev_eta": float(eta), "rev_ema": bool(use_ema)}
    st.session_state["rev_settings_for"] = info.name  # the widgets now hold this run's values
    del seed, n
    return {"params": sampler_params(info), "button": c7, "estimate": c8}


def sampler_params(info: runs.RunInfo) -> dict:
    """The sampler settings the widgets hold now (read from session state, so a click's callback sees
    the values of the last widget change even when the rerun that drew the button was cut short)."""
    state = st.session_state
    sampler = state["rev_sampler"]
    has_ema = (info.path / "ema.safetensors").exists()
    return {"sampler": sampler, "steps": int(state["rev_steps"]) if sampler != "ddpm" else 0,
            "eta": float(state["rev_eta"]) if sampler == "ddim" else 0.0, "seed": int(state["rev_seed"]),
            "n": int(state["rev_n"]), "use_ema": bool(state["rev_ema"] and has_ema)}


def current_params(info: runs.RunInfo) -> dict:
    params = sampler_params(info)
    params.update(guidance.conditional_params(info, params["n"]))
    return params


def estimate(info: runs.RunInfo, params: dict):
    """This machine's recent pace for this network and sampler (core.work.estimates)."""
    guided = bool(params.get("labels")) and params.get("guidance", 1.0) not in (0.0, 1.0)
    return cache.sampling_estimate(info, params["sampler"], params["steps"], params["n"], params["use_ema"], guided)


def feedback_ui() -> None:
    feedback = st.session_state.pop("rev_feedback", None)
    if feedback:
        getattr(st, feedback[0])(feedback[1])


def generation_panel() -> None:
    running_at_full_run = running_job()[1] is not None

    @st.fragment(run_every=POLL_S if running_at_full_run else None)
    def panel() -> None:
        entry, status = running_job()
        if status is not None:
            meta = entry["meta"]
            eta = f" · about {format_duration(status.eta_s)} left" if status.eta_s is not None else ""
            st.progress(status.fraction, text=f"Generating {meta['n']} images with {SAMPLER_LABELS[meta['sampler']]}: "
                                              f"step {status.done} of {status.total} · {status.elapsed_s:.1f} s{eta}")
            st.button("Cancel", icon=":material/close:", on_click=entry["job"].cancel, key="rev_cancel")
        elif running_at_full_run:
            st.rerun()  # finished: a full run collects the result and draws the scrubber

    panel()


def _describe(meta: dict) -> str:
    steps = meta["steps"] or meta["timesteps"]
    extra = f", η = {meta['eta']:g}" if meta["sampler"] == "ddim" else ""
    weights = "EMA" if meta["used_ema"] else "raw"
    return (f"{meta['run']} · {SAMPLER_LABELS[meta['sampler']]} {steps} steps{extra} · seed {meta['seed']} · "
            f"{weights} weights{guidance.describe(meta, meta.get('dataset'))}")


def player(result, meta: dict) -> None:
    """The finished images first, and beside them a frame slider over every recorded step with play /
    pause: both fit a 1400 × 900 window without scrolling."""
    last = len(result.frame_timesteps)  # frames 0..last-1 are recorded steps, frame `last` the result
    ncol = meta.get("ncol") or math.ceil(math.sqrt(meta["n"]))  # a per-class grid: one row per class
    playing = st.session_state.get("rev_playing", False)
    names = guidance.row_names(meta, meta.get("dataset"))

    def grid(images, px: int):
        drawn = scaled_grid(images, ncol=ncol, target_px=px)
        return guidance.labelled_rows(drawn, names) if names else drawn

    final, scrub = st.columns([1, 2])
    final.image(grid(result.images, 300), caption="x_0: the finished images")

    @st.fragment(run_every=PLAY_TICK_S if playing else None)
    def view() -> None:
        if st.session_state.get("rev_playing"):
            step = max(1, math.ceil(last / PLAY_TICKS))
            st.session_state["rev_frame"] = min(last, st.session_state.get("rev_frame", 0) + step)
        c1, c2 = st.columns([1, 5], vertical_alignment="bottom")
        playing_now = st.session_state.get("rev_playing", False)
        if c1.button("Pause" if playing_now else "Play", key="rev_play",
                     icon=":material/pause:" if playing_now else ":material/play_arrow:"):
            at_end = st.session_state.get("rev_frame", 0) >= last
            st.session_state["rev_playing"] = not st.session_state.get("rev_playing", False)
            if st.session_state["rev_playing"] and at_end:
                st.session_state["rev_frame"] = 0
            st.rerun()  # a full run re-registers the fragment with (or without) its timer
        frame = c2.slider("Frame", 0, last, key="rev_frame",
                          help="0 = pure noise x_T; the last frame is the finished images")
        if frame < last:
            t = result.frame_timesteps[frame]
            xt, x0 = result.frames_xt[frame], result.frames_x0[frame]
            st.caption(f"Frame {frame} of {last}: t = {t}. Left, x_t going into the step at t; right, the "
                       "clean image x̂0 the model predicts from it.")
        else:  # x_t and x̂0 are the finished images now
            xt = x0 = result.images
            st.caption(f"Frame {last} of {last}: the finished images. Press Play, or drag back towards the noise.")
        left, right = st.columns(2)
        left.image(grid(xt, 280), caption="x_t")
        right.image(grid(x0, 280), caption="predicted x̂0")
        if st.session_state.get("rev_playing") and frame >= last:
            st.session_state["rev_playing"] = False
            st.rerun()

    with scrub:
        view()


def exports_ui(result, meta: dict) -> None:
    ncol = meta.get("ncol") or math.ceil(math.sqrt(meta["n"]))
    stem = f"{meta['run']}-{meta['sampler']}{meta['steps'] or meta['timesteps']}-seed{meta['seed']}"
    side_by_side = st.toggle("GIF shows x_t | x̂0 side by side", value=True, key="rev_gif_both",
                             persist_state="session", help="Off: x_t only")
    c1, c2, c3 = st.columns(3)
    c1.download_button("Final grid (PNG)", data=grid_png(result.images, ncol=ncol, scale=4), file_name=f"{stem}.png",
                       mime="image/png", icon=":material/download:", on_click="ignore", key="rev_png")
    # GIF and frames are built only when clicked (deferred data): the .npz of a 1000-step run is big.
    c2.download_button("Reverse process (GIF)", file_name=f"{stem}.gif", mime="image/gif",
                       data=lambda: reverse_gif(result.frames_xt, result.frame_timesteps, final=result.images,
                                                ncol=ncol, scale=3,
                                                frames_x0=result.frames_x0 if side_by_side else None),
                       icon=":material/download:", on_click="ignore", key="rev_gif")
    c3.download_button("All frames (.npz)", file_name=f"{stem}.npz", mime="application/octet-stream",
                       data=lambda: frames_npz(result.images, result.frame_timesteps, result.frames_xt,
                                               result.frames_x0),
                       icon=":material/download:", on_click="ignore", key="rev_npz")


st.title("Reverse process")
st.caption("Generate images from pure noise with a trained run, then scrub through every step: x_t and the "
           "model's current guess of the clean image x̂0.")

candidates = sampleable(runs.list_runs(runs_dir()))
if not candidates:
    st.info("No trained run yet. Train one on the **Train** page (the *Tiny smoke test* preset takes seconds).")
    st.stop()

top = st.columns([3, 3, 2, 2], vertical_alignment="bottom")
with top[0]:
    info = run_picker_ui(candidates, key="rev_run", help="Runs with saved weights")
drawn = sampler_ui(info, top[1:])
params = drawn["params"]
params.update(guidance.conditional_ui(info, params["n"]))  # class, γ and row-per-class grid: step 10 runs only
drawn["button"].button("Generate", icon=":material/auto_awesome:", type="primary", on_click=_generate,
                       args=(str(info.path),), key="rev_generate", help="Runs in the background; the page stays usable.")
_collect_finished()
if st.session_state.get("rev_job") is None:  # while generating, the live "left" figure replaces it
    guess = estimate(info, params)
    drawn["estimate"].caption(f"About {format_duration(max(1.0, guess.seconds))} here ({guess.note}).")
feedback_ui()
generation_panel()

done = st.session_state.get("rev_result")
if done is not None and done["meta"]["run"] != info.name:
    st.caption(f"The last images were generated with **{done['meta']['run']}**; pick it above to see them "
               "again, or click **Generate** for this run.")
    done = None
if done is not None:
    st.markdown(f"**{_describe(done['meta'])}** · generated in {done['elapsed_s']:.1f} s")
    player(done["result"], done["meta"])
    exports_ui(done["result"], done["meta"])
guidance.explorer_ui(info, params)
