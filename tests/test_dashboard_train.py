"""Dashboard, Train page: presets fill the form, a tiny run trains in the background job to the end,
a second start is refused while one runs, Stop and Resume work, bad values and failures are shown."""
from __future__ import annotations

import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.config import DEFAULT_FEW_STEP_SAMPLER
from core.store import runs
from core.config import PRESETS
from dashboard.state import form_memory, job_manager

pytestmark = pytest.mark.integration  # the job trains on real FashionMNIST images

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("DDPM_RUNS_DIR", str(path))
    form_memory().clear()  # every test starts from the default preset, as a fresh server does
    yield path
    manager = job_manager()  # never leave a job running into the next test
    manager.stop()
    if manager.job is not None:
        assert manager.job.join(120)
    runner = manager.queue_runner  # nor a queue worker
    if runner is not None:
        runner.stop()
        assert runner.join(120)


def train_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/train.py").run()
    assert not at.exception
    return at


def choose_tiny(at: AppTest, **fields) -> None:
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    for name, value in fields.items():
        widget = at.text_input(key=f"f_{name}") if name == "run_name" else at.number_input(key=f"f_{name}")
        widget.set_value(value)
    at.button(key="train_button").click().run()


def wait_finished(at: AppTest, timeout: float = 120.0) -> None:
    job = job_manager().job
    assert job is not None and job.join(timeout), "the training job did not end in time"
    at.run()
    assert not at.exception


def test_presets_fill_the_form(runs_dir):
    at = train_page()
    assert at.selectbox(key="train_preset").value == "Quick CPU demo"
    assert at.number_input(key="f_time_budget_s").value == 300.0
    choose_preset = at.selectbox(key="train_preset")
    choose_preset.set_value("Book").run()
    assert at.selectbox(key="f_model").value == "unet" and at.selectbox(key="f_optimizer").value == "adam"
    assert at.number_input(key="f_timesteps").value == 1000 and at.number_input(key="f_lr").value == 1e-3
    assert at.text_input(key="f_run_name").value.startswith("book-unet-adam-")
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    assert at.number_input(key="f_timesteps").value == 20 and at.number_input(key="f_limit_images").value == 512
    assert at.selectbox(key="f_model").value == "improved_unet"


def test_tiny_run_trains_to_the_end_and_shows_curve_and_grid(runs_dir):
    at = train_page()
    choose_tiny(at, run_name="tiny-ui", max_steps=8)
    assert "Started run **tiny-ui**" in at.success[0].value
    wait_finished(at)
    assert "tiny-ui" in at.markdown[0].value and "finished" in at.markdown[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Step"] == "8/8" and metrics["Last loss"] != "—"
    assert len(at.get("plotly_chart")) == 1
    assert ["final"] in [img.captions for img in at.image]
    info = runs.run_info(runs_dir / "tiny-ui")
    assert info.state == "finished" and info.step == 8
    assert runs.load_config(runs_dir / "tiny-ui").schedule.timesteps == PRESETS["tiny"].schedule.timesteps
    # The run name field offers a fresh name, so a second click does not collide.
    assert at.text_input(key="f_run_name").value != "tiny-ui"


def test_second_start_is_refused_then_stop_and_resume(runs_dir):
    at = train_page()
    choose_tiny(at, run_name="long", max_steps=100_000, epochs=1000)
    at.text_input(key="f_run_name").set_value("second")
    at.button(key="train_button").click().run()
    assert any("one run at a time" in w.value for w in at.warning)
    assert not (runs_dir / "second").exists()

    other_tab = train_page()  # a second session (a reload, another tab) shows the same running job
    assert "long" in other_tab.markdown[0].value
    assert [b for b in other_tab.button if b.key == "stop_button"]

    deadline = time.monotonic() + 60  # wait until it really trains, so Stop has something to stop
    while job_manager().job.snapshot().step < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    at.run()
    at.button(key="stop_button").click().run()
    wait_finished(at)
    assert runs.run_info(runs_dir / "long").state == "stopped"
    assert "stopped" in at.markdown[0].value and not [b for b in at.button if b.key == "stop_button"]

    # Resume it from the expander, then stop it again.
    at.selectbox(key="resume_pick").set_value("long")
    at.button(key="resume_button").click().run()
    assert "Resumed run **long**" in at.success[0].value
    resumed = job_manager().job
    assert resumed.run_dir == runs_dir / "long" and resumed.alive
    job_manager().stop()
    wait_finished(at)
    assert runs.run_info(runs_dir / "long").state == "stopped"


def test_bad_values_are_reported_next_to_the_form(runs_dir):
    at = train_page()
    choose_tiny(at, run_name="../escape")
    assert "name = '../escape' is not allowed" in at.error[0].value
    at.number_input(key="f_batch_size").set_value(1024)
    at.text_input(key="f_run_name").set_value("too-big-batch")
    at.button(key="train_button").click().run()
    assert "batch_size = 1024 is not allowed" in at.error[0].value
    assert not at.exception
    assert not runs_dir.exists() or not any(runs_dir.iterdir())  # no folder for a refused run


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to fail on device=cuda")
def test_a_failed_run_shows_its_error_and_the_app_keeps_working(runs_dir):
    at = train_page()
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    at.selectbox(key="f_device").set_value("cuda")
    at.text_input(key="f_run_name").set_value("no-gpu")
    at.button(key="train_button").click().run()
    wait_finished(at)
    assert "device = 'cuda' is not allowed" in at.error[0].value
    assert runs.run_info(runs_dir / "no-gpu").state == "failed"
    at.switch_page("views/runs.py").run()  # the rest of the app still works, and lists the failure
    assert not at.exception
    table = at.dataframe[0].value
    assert table.loc[table["run"] == "no-gpu", "status"].item() == "failed"


def test_the_run_name_follows_model_and_optimizer_until_the_user_types_one(runs_dir, monkeypatch):
    from dashboard import presets

    fixed = presets.default_run_name  # one clock second for the whole test: names differ only by the form
    monkeypatch.setattr(presets, "default_run_name", lambda p, m, o, now=None: fixed(p, m, o, now=1.7e9))
    at = train_page()
    assert at.text_input(key="f_run_name").value.startswith("quick-improved_unet-adamw-")
    at.selectbox(key="f_optimizer").set_value("adam").run()
    assert at.text_input(key="f_run_name").value.startswith("quick-improved_unet-adam-")
    at.selectbox(key="f_model").set_value("unet").run()
    assert at.text_input(key="f_run_name").value.startswith("quick-unet-adam-")
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    offered = at.text_input(key="f_run_name").value
    (runs_dir / offered).mkdir(parents=True)  # a run of that name exists (started within the same second)
    at.selectbox(key="f_optimizer").set_value("adam").run()
    at.selectbox(key="f_optimizer").set_value("adamw").run()
    assert at.text_input(key="f_run_name").value == offered + "-2"
    at.text_input(key="f_run_name").set_value("my-own").run()
    at.selectbox(key="f_optimizer").set_value("adamw").run()
    assert at.text_input(key="f_run_name").value == "my-own"


def test_a_reload_or_second_tab_starts_from_the_last_choice(runs_dir):
    at = train_page()
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    at.number_input(key="f_max_steps").set_value(12).run()
    other = train_page()  # a new session: a reload, or another tab
    assert other.selectbox(key="train_preset").value == "Tiny smoke test"
    assert other.number_input(key="f_max_steps").value == 12
    assert other.number_input(key="f_timesteps").value == 20


def test_alpha_bar_T_is_shown_and_warned_about(runs_dir):
    at = train_page()
    assert any(c.value.startswith("ᾱ_T = ") and "pure noise" in c.value for c in at.caption)
    assert not at.warning
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    at.toggle(key="f_scale_to_timesteps").set_value(False).run()  # the book's betas at T = 20: not noise
    assert any(w.value.startswith("ᾱ_T = 0.8") for w in at.warning)


def test_advanced_settings_show_only_what_the_model_uses(runs_dir):
    at = train_page()
    assert at.toggle(key="f_attention").value is True  # quick: the ImprovedUNet with attention at 7x7
    assert at.selectbox(key="f_grid_sampler").value == DEFAULT_FEW_STEP_SAMPLER  # previews: the best few-step sampler
    at.selectbox(key="train_preset").set_value("Book").run()
    assert "f_attention" not in [t.key for t in at.toggle]  # the book's UNet has no attention to set
    assert at.selectbox(key="f_pixel_range").value == "unit"


def test_help_says_what_tiny_takes(runs_dir):
    at = train_page()
    assert "28 s" in at.selectbox(key="train_preset").help and "a few seconds" not in \
        at.selectbox(key="train_preset").help


def test_a_deleted_run_no_longer_shows(runs_dir):
    at = train_page()
    choose_tiny(at, run_name="gone", max_steps=4)
    wait_finished(at)
    assert "gone" in at.markdown[0].value
    runs.delete_run(runs_dir, "gone")
    at.run()
    assert not any("gone" in m.value for m in at.markdown)


# -- the run queue ------------------------------------------------------------------------------------
def queue_entries(runs_dir):
    from core.work import queue
    return queue.read_queue(runs_dir).entries


def test_add_to_queue_trains_two_runs_in_turn_with_reorder_remove_and_eval(runs_dir):
    from core.work import queue

    at = train_page()
    assert any("Nothing queued" in i.value for i in at.info)
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    queue.pause(runs_dir)  # hold the queue while it is arranged, so nothing starts yet
    for name in ("qa", "qb", "qc"):
        at.text_input(key="f_run_name").set_value(name)
        at.number_input(key="f_max_steps").set_value(3)
        at.button(key="queue_add_button").click().run()
        assert f"Queued run **{name}**" in at.success[0].value
    assert not at.exception
    ids = {e.run: e.id for e in queue_entries(runs_dir)}
    assert [e.state for e in queue_entries(runs_dir)] == ["queued"] * 3
    at.button(key=f"queue_up_{ids['qc']}").click().run()
    assert [e.run for e in queue.read_queue(runs_dir).queued] == ["qa", "qc", "qb"]
    at.button(key=f"queue_remove_{ids['qb']}").click().run()
    assert [e.run for e in queue.read_queue(runs_dir).queued] == ["qa", "qc"]
    assert (runs_dir / "qb").is_dir()  # removing an entry keeps the run
    at.toggle(key="queue_eval_on").set_value(True)
    at.selectbox(key="queue_eval_sampler").set_value("ddim")
    at.number_input(key="queue_eval_steps").set_value(3)
    at.number_input(key="queue_eval_n").set_value(32)
    at.button(key="queue_eval_save").click().run()
    assert queue.read_queue(runs_dir).eval == queue.EvalSetting("ddim", 3, 32)
    assert any("Queue paused" in w.value for w in at.warning)
    at.button(key="queue_resume").click().run()

    deadline = time.monotonic() + 240
    while any(e.state in ("queued", "running") for e in queue_entries(runs_dir)) and time.monotonic() < deadline:
        time.sleep(0.3)
    qa, qc = queue_entries(runs_dir)
    assert (qa.run, qa.state, qc.run, qc.state) == ("qa", "finished", "qc", "finished"), (qa.error, qc.error)
    assert qa.ended_at <= qc.started_at
    assert runs.read_eval(runs_dir / "qc")[0]["setting"] == "ddim-3"
    at.run()
    assert not at.exception
    assert any("finished" in m.value for m in at.markdown)


def test_train_is_refused_while_the_queue_trains(runs_dir):
    from core.work import queue

    at = train_page()
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    at.text_input(key="f_run_name").set_value("queued-long")
    at.number_input(key="f_max_steps").set_value(100_000)
    at.number_input(key="f_epochs").set_value(1000)
    at.button(key="queue_add_button").click().run()
    runner = job_manager().queue_runner
    deadline = time.monotonic() + 60
    while (runner.snapshot().training is None or runner.snapshot().training.step < 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    at.text_input(key="f_run_name").set_value("direct")
    at.button(key="train_button").click().run()
    assert any("the queue is training run 'queued-long'" in w.value for w in at.warning)
    assert not (runs_dir / "direct").exists()
    at.run()
    assert [b for b in at.button if b.key == "queue_stop"]
    at.button(key="queue_stop").click().run()
    while runner.training_run is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    at.run()
    assert queue_entries(runs_dir)[0].state == "stopped"
    assert any("Queue paused" in w.value and "was stopped" in w.value for w in at.warning)
    runner.stop()
    assert runner.join(60)


def test_a_damaged_queue_file_is_shown_and_left_alone(runs_dir):
    runs_dir.mkdir(parents=True)
    path = runs_dir / "queue.json"
    path.write_bytes(b'{"format_version": 1, "entries": 7}')
    at = train_page()
    assert any("is damaged" in e.value and "delete it" in e.value for e in at.error)
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    at.text_input(key="f_run_name").set_value("not-queued")
    at.button(key="queue_add_button").click().run()
    assert any("Not queued" in e.value and "is damaged" in e.value for e in at.error)
    assert not (runs_dir / "not-queued").exists()
    assert path.read_bytes() == b'{"format_version": 1, "entries": 7}'


def test_objective_fields_come_from_the_preset_and_reach_the_config(runs_dir):
    """Issue 10: the v-prediction target and Min-SNR-γ sit in Advanced, the book's objective by default."""
    from dashboard.presets import config_from_form
    at = train_page()
    # the quick preset (the default) trains with Min-SNR-5, as the ablation's five-minute check chose
    assert at.selectbox(key="f_prediction").value == "eps" and at.number_input(key="f_min_snr_gamma").value == 5.0
    at.selectbox(key="f_prediction").set_value("v")
    at.number_input(key="f_min_snr_gamma").set_value(3.0).run()
    assert not at.exception
    config = config_from_form(at.selectbox(key="train_preset").value, form_memory()["values"])
    assert (config.train.prediction, config.train.min_snr_gamma) == ("v", 3.0)
    at.selectbox(key="train_preset").set_value("Book").run()  # a preset puts the book's objective back
    assert at.selectbox(key="f_prediction").value == "eps" and at.number_input(key="f_min_snr_gamma").value == 0.0
