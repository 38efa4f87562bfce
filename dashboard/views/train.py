"""Train: a form (filled by presets) that starts one background training run or adds it to the run
queue, the live progress of both, and the queue itself (order, remove, resume, evaluation setting).

The job and the queue worker live in the process-wide `JobManager`, so a reload or a second tab shows
the same run; the queue is `queue.json` in the runs folder (`core.queue`), shared with the CLI. The
page only polls snapshots with `st.fragment(run_every=...)`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from core.work import queue
from core.store import runs
from core.config import (DEFAULT_FEW_STEP_SAMPLER, DEVICE_NAMES, LABEL_DROPOUT_MODES,
                         MAX_MIN_SNR_GAMMA, MODEL_LABELS, OPTIMIZER_LABELS, OPTIMIZER_NAMES, PIXEL_RANGE_LABELS,
                         PIXEL_RANGES, PREDICTION_LABELS, PREDICTION_NAMES, SAMPLER_LABELS, SAMPLER_NAMES,
                         SCHEDULE_NAMES, ConfigError)
from core.work.jobs import JobBusy
from core.train.training import Progress, total_steps_for
from dashboard import cache, data_source
from dashboard.charts import (format_duration, live_loss_figure, plain_number, smoothed_eta, steady_images_per_s,
                              upscale)
from dashboard.presets import (DEFAULT_PRESET, FORM_FIELDS, FORM_PRESETS, TINY_TAKES, UNUSED_MODEL_FIELDS,
                               config_from_form, default_run_name, form_values)
from dashboard.state import form_memory, job_manager, runs_dir
from dashboard.widgets import STATE_ICONS

MODEL_ORIGIN = {"unet": "the book", "improved_unet": "the blog"}
POLL_S = 1.5
IDLE_POLL_S = 3.0         # an idle page looks this often for a run started elsewhere (another tab)
NOISE_ENOUGH = 1e-3       # ᾱ_T above this: x_T still holds a visible trace of x_0

manager = job_manager()


# -- callbacks (run before the page script, so they may set widget values) ---------------------------
def _fresh_name(preset: str) -> None:
    """A new default name from the form's model and optimizer; remembered so edits can be told apart."""
    base = default_run_name(preset, st.session_state["f_model"], st.session_state["f_optimizer"])
    name, k = base, 1
    while (runs_dir() / name).exists():  # started within the same second: never offer a taken name
        k += 1
        name = f"{base}-{k}"
    st.session_state["f_run_name"] = st.session_state["f_auto_name"] = name


def _apply_preset() -> None:
    name = st.session_state["train_preset"]
    for field, value in form_values(FORM_PRESETS[name]).items():
        st.session_state[f"f_{field}"] = value
    _fresh_name(name)


def _follow_name() -> None:
    """The model or optimizer changed: the name follows, unless the user typed one of their own."""
    if st.session_state.get("f_run_name") == st.session_state.get("f_auto_name"):
        _fresh_name(st.session_state["train_preset"])


def _form_values() -> dict:
    return {field: st.session_state[f"f_{field}"] for field in FORM_FIELDS if f"f_{field}" in st.session_state}


def _form_config(preset: str):
    """The run the form describes: the preset with the form's values, on the chosen data (a folder completed
    from what is in it, as the CLI does)."""
    values = _form_values()
    conditional = bool(values.get("num_classes", FORM_PRESETS[preset].model.num_classes))
    # The label count is the data's (10 for FashionMNIST, the folder's classes): set once the data is known.
    config = config_from_form(preset, {**values, "num_classes": 0})
    return data_source.config_with_data(config, conditional=conditional)


def _start_training() -> None:
    preset = st.session_state["train_preset"]
    name = str(st.session_state.get("f_run_name", "")).strip()
    try:
        config = _form_config(preset)
        manager.start_new(runs_dir(), name, config)
    except JobBusy as exc:
        st.session_state["train_feedback"] = ("warning", str(exc))
    except (ConfigError, runs.RunError, OSError) as exc:
        st.session_state["train_feedback"] = ("error", f"Not started: {exc}")
    else:
        st.session_state["train_feedback"] = ("success", f"Started run **{name}**.")
        _fresh_name(preset)


def _queue_run() -> None:
    """Add to queue: create the run folder with the form's config and queue it."""
    preset = st.session_state["train_preset"]
    name = str(st.session_state.get("f_run_name", "")).strip()
    try:
        config = _form_config(preset)
        entry = manager.queue_new(runs_dir(), name, config, eval_device=cache.DEVICE)
    except (ConfigError, runs.RunError, OSError) as exc:  # QueueDamaged and QueueError are RunErrors
        st.session_state["train_feedback"] = ("error", f"Not queued: {exc}")
    else:
        place = queue.read_queue(runs_dir()).position(entry.id)
        st.session_state["train_feedback"] = ("success", f"Queued run **{name}**" +
                                              (f" (place {place} in the queue)." if place else "."))
        _fresh_name(preset)


def _resume(run_dir: str) -> None:
    try:
        manager.resume(Path(run_dir))
    except (JobBusy, runs.RunError, ConfigError) as exc:
        st.session_state["train_feedback"] = ("warning", str(exc))
    else:
        st.session_state["train_feedback"] = ("success", f"Resumed run **{Path(run_dir).name}**.")


# -- widgets -----------------------------------------------------------------------------------------
def preset_ui() -> str:
    """The preset picker; a new session (a reload, a second tab) starts from the last choice made here."""
    if "train_preset" not in st.session_state:
        memory = form_memory()
        if memory.get("preset") in FORM_PRESETS:
            st.session_state["train_preset"] = memory["preset"]
            for field, value in memory.get("values", {}).items():
                st.session_state[f"f_{field}"] = value
            _fresh_name(memory["preset"])
        else:
            st.session_state["train_preset"] = DEFAULT_PRESET
            _apply_preset()
    return st.selectbox("Preset", list(FORM_PRESETS), key="train_preset", on_change=_apply_preset,
                        help="Fills the form. Book: step 9 exactly (about 10 epochs: hours on a CPU). "
                             "Improved (blog): ImprovedUNet + AdamW + EMA. Quick CPU demo: five minutes on a "
                             f"CPU. Tiny smoke test: {TINY_TAKES}, to try the UI.")


def schedule_note_ui(preset: str) -> None:
    """ᾱ_T of the form's schedule: how much of x_0 is left at the last step (should be about 0)."""
    try:
        config = config_from_form(preset, _form_values())
    except ConfigError:
        return  # the Train click reports it next to the form
    alpha_bar_T = float(cache.scheduler(config.schedule).alpha_bars[-1])
    if alpha_bar_T > NOISE_ENOUGH:
        st.warning(f"ᾱ_T = {plain_number(alpha_bar_T)}: at t = T some of x₀ is still there (√ᾱ_T = "
                   f"{plain_number(alpha_bar_T ** 0.5)}), so sampling starts from noise the model never saw. Raise T "
                   "or use the linear schedule.", icon=":material/warning:")
    else:
        st.caption(f"ᾱ_T = {plain_number(alpha_bar_T)}: x_T is pure noise, as sampling assumes.")


def train_form_ui(preset: str) -> None:
    """The form; its button starts the run through the `_start_training` callback.

    Not an `st.form`: the run name follows the model and optimizer as they change."""
    with st.container(border=True):
        c1, c2 = st.columns([3, 1])
        c1.text_input("Run name", key="f_run_name", help="Becomes the folder name: letters, digits, . _ -. "
                      "Follows the model and optimizer until you type your own.")
        c2.selectbox("Device", DEVICE_NAMES, key="f_device")
        data_source.data_source_ui()
        c1, c2, c3, c4 = st.columns(4)
        c1.selectbox("Model", list(MODEL_LABELS), format_func=lambda m: f"{MODEL_LABELS[m]} ({MODEL_ORIGIN[m]})",
                     key="f_model", on_change=_follow_name)
        c2.number_input("Base channels", min_value=4, max_value=512, step=4, key="f_base_channels")
        c3.selectbox("Optimizer", OPTIMIZER_NAMES, format_func=OPTIMIZER_LABELS.get, key="f_optimizer",
                     on_change=_follow_name)
        c4.number_input("EMA decay (0 = off)", min_value=0.0, max_value=0.99999, step=0.001, format="%g",
                        key="f_ema_decay")
        c1, c2, c3, c4 = st.columns(4)
        c1.number_input("Learning rate", min_value=0.0, max_value=1.0, step=1e-4, format="%g", key="f_lr")
        c2.number_input("Weight decay", min_value=0.0, max_value=10.0, step=0.01, format="%g",
                        key="f_weight_decay", help="Adam: an L2 term in the gradient. AdamW: decoupled.")
        c3.number_input("Batch size", min_value=1, max_value=60_000, step=16, key="f_batch_size")
        c4.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="f_seed")
        c1, c2, c3, c4 = st.columns(4)
        c1.number_input("Epochs", min_value=0, max_value=100_000, step=1, key="f_epochs")
        c2.number_input("Max steps (0 = no limit)", min_value=0, step=100, key="f_max_steps")
        c3.number_input("Time budget, s (0 = none)", min_value=0.0, step=60.0, format="%g", key="f_time_budget_s")
        c4.number_input("Use first N images (0 = all)", min_value=0, step=512, key="f_limit_images")
        c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        c1.number_input("Timesteps T", min_value=2, max_value=10_000, step=10, key="f_timesteps")
        c2.selectbox("Noise schedule", SCHEDULE_NAMES, key="f_schedule")
        with c3:
            schedule_note_ui(preset)
        with st.expander("Advanced: what the presets set and this form hides"):
            model = st.session_state.get("f_model")
            a1, a2, a3, a4 = st.columns(4)
            if "attention" not in UNUSED_MODEL_FIELDS.get(model, ()):
                a1.toggle("Self-attention at 7×7", key="f_attention", help="ImprovedUNet only")
            a2.selectbox("Pixel range", PIXEL_RANGES, format_func=PIXEL_RANGE_LABELS.get, key="f_pixel_range",
                         help="[0, 1]: the book. [−1, 1]: centred data, what the ImprovedUNet presets use")
            a3.number_input("Warm-up steps", min_value=0, step=50, key="f_warmup_steps",
                            help="learning rate ramps up linearly over these steps")
            a4.number_input("Gradient clipping (0 = off)", min_value=0.0, step=0.5, format="%g", key="f_grad_clip")
            a1, a2, a3, a4 = st.columns(4)
            a4.toggle("Scale betas with T", key="f_scale_to_timesteps",
                      help="linear schedule: the book's betas are for T = 1000; scaled by 1000/T, x_T is noise "
                           "for any T (improved-diffusion)")
            a1.toggle("DDPM clips x̂0", key="f_clip_denoised",
                      help="the run's default when sampling with DDPM (the few-step samplers always clip)")
            a2.selectbox("Preview sampler", SAMPLER_NAMES, format_func=SAMPLER_LABELS.get, key="f_grid_sampler",
                         help="for the sample grid at each epoch's end")
            a3.number_input("Preview steps", min_value=1, step=5, key="f_grid_steps")
            a1, a2, _, _ = st.columns(4)
            a1.selectbox("Network predicts", PREDICTION_NAMES, key="f_prediction",
                         format_func=lambda p: {"eps": "noise ε (the book)", "v": "velocity v"}.get(p, p),
                         help="v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022); every sampler converts it to ε̂")
            a2.number_input("Min-SNR-γ (0 = off)", min_value=0.0, max_value=MAX_MIN_SNR_GAMMA, step=1.0,
                            format="%g", key="f_min_snr_gamma",
                            help="loss weight min(SNR, γ) over the target's SNR factor (Hang et al. 2023, who "
                                 "use γ = 5); 0 is the book's plain MSE")
        conditional_fields_ui()
        b1, b2, b3 = st.columns([1, 1, 4], vertical_alignment="center")
        b1.button("Train", icon=":material/rocket_launch:", type="primary", on_click=_start_training,
                  key="train_button", help="Train now (refused while the queue trains a run)")
        b2.button("Add to queue", icon=":material/queue:", on_click=_queue_run, key="queue_add_button",
                  help="Create the run and queue it: queued runs train one after another (see Queue below)")
        with b3:
            training_estimate_ui(preset)
    form_memory().update(preset=preset, values={**_form_values(), **data_source.form_values()})


def conditional_fields_ui() -> None:
    """Step 10's options: class labels, and the label dropout that classifier-free guidance needs."""
    names = data_source.class_names()
    options = (0, len(names)) if names else (0,)
    if st.session_state.get("f_num_classes", 0) not in options:  # a preset's 10 labels on a 3-class folder
        st.session_state["f_num_classes"] = options[-1] if st.session_state.get("f_num_classes") else 0
    c1, c2, c3, _ = st.columns(4)
    c1.selectbox("Class labels", options, key="f_num_classes",
                 format_func=lambda k: "none (unconditional)" if k == 0 else f"{k} classes (step 10)",
                 help="A label embedding lets you ask for a class when sampling (step 10 of the book): "
                      + (", ".join(names) if names else "this data has no classes (a flat folder)"))
    c2.number_input("Label dropout", min_value=0.0, max_value=0.99, step=0.05, format="%g", key="f_label_dropout",
                    help="Share of labels dropped while training, so the same network also learns the "
                         "unconditional ε̂ that guidance needs (book: 0.1; 0 = no guidance).")
    c3.selectbox("Dropout per", LABEL_DROPOUT_MODES, key="f_label_dropout_mode",
                 format_func={"sample": "sample", "batch": "batch (the book)"}.get)


def feedback_ui() -> None:
    """The outcome of the last Train / Resume click, right under the form."""
    feedback = st.session_state.pop("train_feedback", None)
    if feedback:
        kind, text = feedback
        getattr(st, kind)(text)


def resume_ui() -> None:
    candidates = [i for i in runs.list_runs(runs_dir()) if i.readable and i.state in runs.RESUMABLE_STATES]
    with st.expander(f"Resume a run ({len(candidates)} can be resumed)"):
        if not candidates:
            st.caption("Stopped, interrupted and failed runs show up here.")
            return
        by_name = {i.name: i for i in candidates}
        name = st.selectbox("Run to resume", list(by_name), key="resume_pick",
                            format_func=lambda n: f"{n} "
                                                  f"(step {by_name[n].step}, {by_name[n].state})")
        st.button("Resume", icon=":material/play_arrow:", on_click=_resume, args=(str(by_name[name].path),),
                  key="resume_button")


# -- live progress -----------------------------------------------------------------------------------
def _fraction(p: Progress) -> float:
    if p.total_steps:
        return p.fraction
    try:  # bounded by a time budget alone
        budget = runs.load_config(Path(p.run_dir)).train.time_budget_s
    except runs.RunError:
        return 0.0
    return min(1.0, p.elapsed_s / budget) if budget else 0.0


def _latest_grid(p: Progress) -> tuple[np.ndarray, str] | None:
    path = Path(p.latest_grid) if p.latest_grid else None
    if path is None or not path.is_file():
        grids = sorted((Path(p.run_dir) / "samples").glob("*.png"), key=lambda f: f.stat().st_mtime)
        path = grids[-1] if grids else None
    if path is None:
        return None
    with Image.open(path) as img:
        return np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB")), path.stem


def _history(p: Progress) -> list[tuple[float, int]]:
    """This page's own (elapsed_s, step) readings of the job, the last 200."""
    history = st.session_state.setdefault("train_eta", {}).setdefault(p.run_name, [])
    if p.step and (not history or history[-1] != (p.elapsed_s, p.step)):
        history.append((p.elapsed_s, p.step))
        del history[:-200]
    return history


def eta_ui_value(p: Progress) -> float | None:
    """The ETA over the last minute's pace; before two readings, this machine's recorded pace for the
    network (core.work.estimates), so it never sits at "—"."""
    if not p.active:
        return None
    history = _history(p)
    budget, config = None, None
    try:
        config = runs.load_config(Path(p.run_dir))
        budget = config.train.time_budget_s - p.elapsed_s if config.train.time_budget_s else None
    except runs.RunError:
        pass
    eta = smoothed_eta(history, p.total_steps, budget)
    if eta is None and p.eta_s:
        eta = p.eta_s
    if eta is None and config is not None and p.total_steps:
        eta = cache.training_estimate(runs_dir(), config, p.total_steps - p.step).seconds
        eta = min(eta, budget) if budget is not None else eta
    return eta


def images_per_s_value(p: Progress) -> float:
    """A steady figure: the last minute's pace while training; the run's average once it has stopped."""
    try:
        batch = runs.load_config(Path(p.run_dir)).train.batch_size
    except runs.RunError:
        return p.images_per_s
    if not p.active:
        return p.step * batch / p.elapsed_s if p.elapsed_s > 0 and p.step else p.images_per_s
    steady = steady_images_per_s(_history(p), batch)
    return steady if steady is not None else p.images_per_s


def training_estimate_ui(preset: str) -> None:
    """How long the form's run would take here, before it is started."""
    try:
        config = _form_config(preset)  # the form's data too: a folder's own count, size and channels
    except ConfigError:
        return  # the form's own error appears on Train
    try:
        n_images = len(data_source.run_images(config.data))
    except Exception:  # noqa: BLE001 - data not installed or unreadable: Train says so; estimate the usual size
        n_images = 60_000
    n_images = min(n_images, config.train.limit_images or n_images)
    steps = total_steps_for(config, n_images)
    budget = config.train.time_budget_s
    if not steps and not budget:
        return
    guess = cache.training_estimate(runs_dir(), config, steps) if steps else None
    seconds = min(x for x in (guess.seconds if guess else None, budget or None) if x is not None)
    why = guess.note if guess is not None and (not budget or guess.seconds < budget) else "its time budget"
    st.caption(f"About **{format_duration(seconds)}** here for {steps:,} steps ({why})." if steps else
               f"About **{format_duration(seconds)}** here ({why}).", help=None)


def _loss_description(p: Progress) -> str:
    """What the run's loss measures: the book's MSE between ε and ε̂, or the run's objective."""
    try:
        train = runs.load_config(Path(p.run_dir)).train
    except runs.RunError:
        train = None
    target = PREDICTION_LABELS[train.prediction] if train is not None else "ε"
    text = f"MSE between {target} and the model's {target}̂"
    if train is not None and train.min_snr_gamma:
        text += f", Min-SNR-{train.min_snr_gamma:g} weighted"
    return text


def progress_ui(p: Progress, key: str = "train_loss_chart") -> None:
    eta = eta_ui_value(p)
    icon = STATE_ICONS.get(p.state, STATE_ICONS["running"])
    st.markdown(f"#### {icon} Run `{p.run_name}` — {p.state}" + (f" ({p.message})" if p.message else ""))
    total = f"/{p.total_steps}" if p.total_steps else ""
    epochs = f"/{p.epochs}" if p.epochs else ""
    speed = images_per_s_value(p)
    st.progress(_fraction(p), text=f"step {p.step}{total} · epoch {p.epoch}{epochs} · "
                                   f"{speed:,.0f} images/s · ETA {format_duration(eta)}")
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.metric("Step", f"{p.step}{total}")
    c2.metric("Epoch", f"{p.epoch}{epochs}")
    c3.metric("Images/s", f"{speed:,.0f}",
              help="over the last minute" if p.active else "the run's average (images trained ÷ training time)")
    if p.active:
        c4.metric("ETA", format_duration(eta), help="from the pace over the last minute")
    else:
        c4.metric("Training time", format_duration(p.elapsed_s))
    c5.metric("Last loss", f"{p.losses[-1]:.4f}" if p.losses else "—")
    if p.state == "failed":
        st.error("Training failed: " + (p.error or "").replace("resume it with --resume", "use Resume below")
                 .replace("--resume", "Resume below"))
    left, right = st.columns([3, 2])
    with left:
        st.caption(f"Loss ({_loss_description(p)}), logged every few steps")
        if p.steps:
            st.plotly_chart(live_loss_figure(p.steps, p.losses), key=key)
        else:
            st.info("The loss curve appears after the first logged steps.")
    with right:
        grid = _latest_grid(p)
        st.caption("Latest sample grid (written at the end of each epoch and of the run)")
        if grid is not None:
            st.image(upscale(grid[0], 360), caption=grid[1])
        else:
            st.info("No sample grid yet.")


def job_panel() -> None:
    job = manager.job
    alive_at_full_run = job is not None and job.alive

    @st.fragment(run_every=POLL_S if alive_at_full_run else None)
    def live() -> None:
        current = manager.job
        if current is None:
            st.info("No run has been trained in this server session yet. Pick a preset and click **Train**.")
            return
        p = current.snapshot()
        progress_ui(p)
        if p.active:  # the thread outlives its last report by a moment: go by the reported state
            if st.button("Stop", icon=":material/stop:", key="stop_button",
                         help="Saves a checkpoint, then stops; resume it later."):
                manager.stop()
                st.toast("Stopping: saving a checkpoint first.")
        if alive_at_full_run and not current.alive:
            st.rerun()  # the job just ended: a full rerun drops the polling and refreshes the run lists
        if current.traceback:
            with st.expander("Traceback"):
                st.code(current.traceback)

    live()


def shown_job():
    """The current (or last) job, unless its run folder was deleted since."""
    job = manager.job
    if job is not None and not job.alive and not job.run_dir.exists():
        return None
    return job


def watch_for_other_tabs() -> None:
    """While nothing runs, look every few seconds for a run started elsewhere (another tab, the Runs page)."""
    seen = id(shown_job())

    @st.fragment(run_every=IDLE_POLL_S)
    def watch() -> None:
        job = shown_job()
        if id(job) != seen or (job is not None and job.alive):
            st.rerun()

    watch()


# -- the run queue -----------------------------------------------------------------------------------
QUEUE_ICONS = {"queued": ":material/schedule:", "running": ":material/directions_run:",
               "finished": ":material/check_circle:", "failed": ":material/error:",
               "stopped": ":material/pause_circle:", "interrupted": ":material/warning:"}


def _queue_action(action, *args) -> None:
    try:
        action(runs_dir(), *args)
    except runs.RunError as exc:  # QueueDamaged, QueueError
        st.session_state["queue_feedback"] = ("error", str(exc))


def _resume_queue() -> None:
    _queue_action(queue.resume)
    manager.ensure_queue_runner(runs_dir(), eval_device=cache.DEVICE)


def _save_eval_setting() -> None:
    if not st.session_state.get("queue_eval_on"):
        return _queue_action(queue.set_eval, None)
    sampler = st.session_state["queue_eval_sampler"]
    steps = 0 if sampler == "ddpm" else int(st.session_state["queue_eval_steps"])
    try:
        setting = queue.check_eval_setting(sampler, steps, int(st.session_state["queue_eval_n"]))
    except ConfigError as exc:
        st.session_state["queue_feedback"] = ("error", str(exc))
        return
    _queue_action(queue.set_eval, setting)


def _pause_reason(current: queue.Queue) -> str:
    interrupted = [e.run for e in current.entries if e.state == "interrupted"]
    stopped = [e.run for e in current.entries if e.state == "stopped"]
    if interrupted:
        return (f"run **{interrupted[0]}** was interrupted (the server stopped while it trained). "
                "Resume the queue to continue it from its last checkpoint.")
    if stopped:
        return f"run **{stopped[0]}** was stopped. Resume the queue to continue it, or remove it."
    return "paused by hand. Resume the queue to start the next run."


def queue_entries_ui(current: queue.Queue) -> None:
    """One row per entry: place in line, run, state, and ↑ ↓ ✕ where they apply."""
    line = current.queued
    for entry in current.entries:
        place = current.position(entry.id)
        c0, c1, c2, c3, c4, c5 = st.columns([0.5, 4, 2, 0.6, 0.6, 0.6], vertical_alignment="center")
        c0.markdown(f"**{place}**" if place else "·")
        c1.markdown(f"`{entry.run}`" + (f"  \n:red[{entry.error}]" if entry.error and entry.state == "failed"
                                        else f"  \n:gray[{entry.error}]" if entry.error else ""))
        c2.markdown(f"{QUEUE_ICONS[entry.state]} {entry.state}")
        if entry.state == "queued":
            c3.button("↑", key=f"queue_up_{entry.id}", on_click=_queue_action, args=(queue.up, entry.id),
                      disabled=place == 1, help="Move up")
            c4.button("↓", key=f"queue_down_{entry.id}", on_click=_queue_action, args=(queue.down, entry.id),
                      disabled=place == len(line), help="Move down")
        if entry.state != "running":
            c5.button("✕", key=f"queue_remove_{entry.id}", on_click=_queue_action, args=(queue.remove, entry.id),
                      help="Remove from the queue (the run folder stays)")


def queue_eval_ui(current: queue.Queue) -> None:
    setting = current.eval
    with st.expander("Evaluate each run when it finishes: " + (f"**{setting.label}**" if setting else "off")):
        if "queue_eval_on" not in st.session_state:
            st.session_state["queue_eval_on"] = setting is not None
            st.session_state["queue_eval_sampler"] = setting.sampler if setting else DEFAULT_FEW_STEP_SAMPLER
            st.session_state["queue_eval_steps"] = (setting.steps or 20) if setting else 20
            st.session_state["queue_eval_n"] = setting.n if setting else 1000
        st.toggle("Evaluate after training", key="queue_eval_on")
        c1, c2, c3 = st.columns([3, 1, 1])
        c1.selectbox("Sampler", SAMPLER_NAMES, format_func=SAMPLER_LABELS.get, key="queue_eval_sampler")
        c2.number_input("Steps", min_value=1, max_value=10_000, key="queue_eval_steps",
                        help="DDPM always runs all T steps; at most the run's T")
        c3.number_input("Images (N)", min_value=2, max_value=10_000, step=100, key="queue_eval_n",
                        help="Compare only figures taken at the same N (the CLI uses 1000)")
        st.caption("Scored with the shipped classifier, as Evaluate on the Runs page; the entry goes into each "
                   "run's eval.json.")
        st.button("Save evaluation setting", key="queue_eval_save", on_click=_save_eval_setting)


def queue_panel() -> None:
    """The queue: its entries, the running one's progress, resume and the evaluation setting."""
    try:
        first = queue.recover(runs_dir())  # a run left `running` by a killed server shows as interrupted
    except queue.QueueDamaged as exc:
        st.subheader("Queue")
        st.error(str(exc), icon=":material/broken_image:")
        return
    polling = bool(first.queued or first.running)

    @st.fragment(run_every=POLL_S if polling else IDLE_POLL_S)
    def live() -> None:
        try:
            current = queue.read_queue(runs_dir())
        except queue.QueueDamaged as exc:
            st.error(str(exc), icon=":material/broken_image:")
            return
        runner = manager.queue_runner
        if current.queued and (runner is None or not runner.alive or runner.runs_dir != runs_dir().resolve()):
            # queued here, from another tab or from the CLI: this server's worker takes them on
            manager.ensure_queue_runner(runs_dir(), eval_device=cache.DEVICE)
        st.subheader(f"Queue ({len(current.queued)} waiting)")
        st.caption("Queued runs train one after another on this server; the queue is a file in the runs folder, "
                   "so it survives a restart and `python -m core queue` sees it too. While the queue trains, "
                   "**Train** is refused (add the run to the queue); a run started with Train makes the queue "
                   "wait until it ends.")
        feedback = st.session_state.pop("queue_feedback", None)
        if feedback:
            getattr(st, feedback[0])(feedback[1])
        if current.paused:
            st.warning("Queue paused: " + _pause_reason(current), icon=":material/pause_circle:")
            st.button("Resume queue", icon=":material/play_arrow:", key="queue_resume", on_click=_resume_queue)
        if not current.entries:
            st.info("Nothing queued. Fill the form and click **Add to queue**.")
        else:
            queue_entries_ui(current)
            if any(e.state in queue.DONE_STATES for e in current.entries):
                st.button("Clear finished", key="queue_clear", on_click=_queue_action, args=(queue.clear_finished,))
        status = manager.queue_runner.snapshot() if manager.queue_runner is not None else None
        if status is not None and status.active and status.training is not None:
            with st.container(border=True):
                progress_ui(status.training, key="queue_loss_chart")
                if status.phase == "evaluating" and status.evaluation is not None:
                    ev = status.evaluation
                    st.progress(ev.fraction, text=f"Evaluating `{ev.run_name}` ({ev.setting}): {ev.phase}")
                st.button("Stop", icon=":material/stop:", key="queue_stop", on_click=manager.stop_queue_run,
                          help="Saves a checkpoint, stops the run and pauses the queue; Resume queue continues it.")
        if status is not None and status.error:
            st.error(status.error)
        queue_eval_ui(current)
        if polling and not (current.queued or current.running):
            st.rerun()  # the queue just emptied: a full rerun refreshes the run lists and slows the polling

    live()


st.title("Train")
st.caption("Pick a preset, adjust the settings, click **Train**. Training runs in the background on this "
           "server, one run at a time; reloading the page or opening a second tab shows the same run.")
if shown_job() is not None:  # the current (or last) run first: that is what a returning user looks for
    job_panel()
    st.divider()
if shown_job() is None or not shown_job().alive:
    watch_for_other_tabs()
st.subheader("New run")
preset = preset_ui()
train_form_ui(preset)
feedback_ui()
resume_ui()
st.divider()
queue_panel()
