"""Dashboard, Reverse process page: generate on a tiny run in the background, scrub and play the
frames, and export a PNG grid, a GIF and the frames as .npz."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import REPO, copy_run, generate, tiny_config
from core.config import DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, SAMPLER_LABELS, ScheduleConfig
from core.store.export import frames_npz, grid_png, reverse_gif

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def app(tiny_run, monkeypatch) -> AppTest:
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tiny_run.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert not at.exception
    return at



def test_widgets_and_no_run_message(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert "No trained run yet" in at.info[0].value


def test_ddim_generate_scrub_and_export(app):
    assert app.selectbox(key="rev_run").value == "tiny"
    assert app.toggle(key="rev_ema").value is True  # the tiny run has EMA weights
    assert app.selectbox(key="rev_sampler").value == DEFAULT_FEW_STEP_SAMPLER
    assert any(c.value.startswith("About ") and " here (" in c.value for c in app.caption)  # before it starts
    app.selectbox(key="rev_sampler").set_value("ddim").run()
    app.number_input(key="rev_steps").set_value(5)
    app.number_input(key="rev_n").set_value(4)
    app.number_input(key="rev_seed").set_value(3).run()
    done = generate(app)
    result, meta = done["result"], done["meta"]
    assert meta["sampler"] == "ddim" and meta["steps"] == 5 and meta["used_ema"]
    assert result.images.shape == (4, 1, 28, 28) and result.frames_xt.shape == (5, 4, 1, 28, 28)

    frame = app.slider(key="rev_frame")
    assert frame.min == 0 and frame.max == 5 and frame.value == 5  # it opens on the finished images
    assert any("the finished images" in c.value for c in app.caption)
    final = app.image[0]
    assert final.captions == ["x_0: the finished images"]
    frame.set_value(2).run()
    assert any(f"Frame 2 of 5: t = {result.frame_timesteps[2]}." in c.value for c in app.caption)
    # The finished grid stays first; the scrubbed frame's x_t and x̂0 beside it.
    assert [img.captions for img in app.image] == [["x_0: the finished images"], ["x_t"], ["predicted x̂0"]]

    labels = [b.label for b in app.get("download_button")]
    assert labels == ["Final grid (PNG)", "Reverse process (GIF)", "All frames (.npz)"]

    # The bytes behind the three buttons (the same calls with the page's own result).
    png = grid_png(result.images, ncol=2, scale=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (4 * (2 * 30 + 2),) * 2
        grid = np.asarray(img)
    np.testing.assert_array_equal(grid[8:8 + 112:4, 8:8 + 112:4], result.images[0, 0])  # image 0, top left
    gif = reverse_gif(result.frames_xt, result.frame_timesteps, final=result.images, ncol=2, scale=3)
    assert gif[:6] == b"GIF89a"
    with Image.open(io.BytesIO(gif)) as img:
        assert img.n_frames == 6  # five steps and the result
        single_width = img.width
    assert app.toggle(key="rev_gif_both").value is True
    both = reverse_gif(result.frames_xt, result.frame_timesteps, final=result.images, ncol=2, scale=3,
                       frames_x0=result.frames_x0)
    with Image.open(io.BytesIO(both)) as img:
        assert img.n_frames == 6 and img.width > 2 * single_width  # x_t | x̂0 on one canvas
    npz = np.load(io.BytesIO(frames_npz(result.images, result.frame_timesteps, result.frames_xt,
                                        result.frames_x0)))
    assert npz["x_t"].shape == (5, 4, 1, 28, 28) and list(npz["timesteps"]) == result.frame_timesteps


def test_ddpm_runs_every_step_and_play_advances(app):
    app.selectbox(key="rev_sampler").set_value("ddpm").run()
    assert app.number_input(key="rev_steps").proto.disabled
    app.number_input(key="rev_n").set_value(2).run()
    done = generate(app)
    assert done["result"].frame_timesteps == list(range(20, 0, -1))  # T = 20, every step recorded
    assert app.slider(key="rev_frame").max == 20

    app.button(key="rev_play").click().run()
    assert app.session_state["rev_playing"] is True
    first = app.slider(key="rev_frame").value
    app.run()  # each run of the player (a timer tick in the browser) advances the frame
    assert app.slider(key="rev_frame").value > first
    app.button(key="rev_play").click().run()  # pause
    assert app.session_state["rev_playing"] is False
    paused_at = app.slider(key="rev_frame").value
    app.run()
    assert app.slider(key="rev_frame").value == paused_at


@pytest.fixture
def two_runs(tiny_run, trained_runs, monkeypatch):
    """The tiny run (EMA, T = 20) and a run without EMA at T = 40 (trained once per session)."""
    config = tiny_config()
    plain = trained_runs(type(config)(model=config.model, schedule=ScheduleConfig(timesteps=40), train=config.train),
                         "plain")
    copy_run(plain, tiny_run.parent)
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tiny_run.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert not at.exception
    return at


def test_each_run_brings_its_own_defaults_and_keeps_what_the_user_set(two_runs):
    at = two_runs
    at.selectbox(key="rev_run").set_value("tiny").run()
    assert at.selectbox(key="rev_sampler").value == DEFAULT_FEW_STEP_SAMPLER
    assert at.number_input(key="rev_steps").value == min(DEFAULT_FEW_STEPS, 20)
    assert at.toggle(key="rev_ema").value is True
    at.number_input(key="rev_steps").set_value(7)
    at.toggle(key="rev_ema").set_value(False).run()

    at.selectbox(key="rev_run").set_value("plain").run()  # no EMA weights, T = 40
    assert at.number_input(key="rev_steps").value == DEFAULT_FEW_STEPS
    assert at.number_input(key="rev_steps").max == 40
    assert at.toggle(key="rev_ema").value is False and at.toggle(key="rev_ema").proto.disabled
    assert at.selectbox(key="rev_sampler").value == DEFAULT_FEW_STEP_SAMPLER

    at.selectbox(key="rev_run").set_value("tiny").run()  # what the user set for tiny comes back
    assert at.number_input(key="rev_steps").value == 7 and at.toggle(key="rev_ema").value is False

    at.switch_page("views/runs.py").run()  # leave and come back: same run, same settings
    at.switch_page("views/reverse.py").run()
    assert at.selectbox(key="rev_run").value == "tiny"
    assert at.number_input(key="rev_steps").value == 7 and at.toggle(key="rev_ema").value is False


def test_the_result_shown_belongs_to_the_picked_run(two_runs):
    at = two_runs
    at.selectbox(key="rev_run").set_value("tiny").run()
    at.number_input(key="rev_steps").set_value(3)
    at.number_input(key="rev_n").set_value(2).run()
    done = generate(at)
    assert done["meta"]["run"] == "tiny"
    assert any(m.value.startswith(f"**tiny · {SAMPLER_LABELS[DEFAULT_FEW_STEP_SAMPLER]} 3 steps") for m in at.markdown)
    at.selectbox(key="rev_run").set_value("plain").run()
    assert not at.get("download_button") and not any("tiny ·" in m.value for m in at.markdown)
    assert any("generated with **tiny**" in c.value for c in at.caption)
    at.selectbox(key="rev_run").set_value("tiny").run()
    assert len(at.get("download_button")) == 3

