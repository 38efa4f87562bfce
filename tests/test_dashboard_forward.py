"""Dashboard, Forward process page (the default page): works with no trained run at all."""
from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.config import ScheduleConfig
from core.schedule import NoiseScheduler

pytestmark = pytest.mark.integration  # draws real FashionMNIST images from ./data

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "no-runs-here"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    return at


def _latex(at: AppTest) -> str:
    return at.latex[0].value


def test_default_page_is_the_forward_process_and_needs_no_run(app):
    assert app.title[0].value == "Forward process"
    assert app.caption[0].value.startswith("The forward process adds Gaussian noise")
    assert [s.label for s in app.slider] == ["Timestep t"]
    assert app.slider(key="fw_t").value == 100 and app.slider(key="fw_t").max == 1000
    captions = [img.captions for img in app.image]
    assert captions[:3] == [["x₀ (image 0)"], ["ε ~ N(0, I)"], ["x_t at t = 100"]]
    assert captions[3][0] == "t = 1" and captions[3][-1] == "t = 1000" and len(captions[3]) == 10
    assert len(app.get("plotly_chart")) == 1
    # The formula carries the real numbers of the book's linear schedule at t = 100.
    alpha_bar = float(NoiseScheduler(ScheduleConfig(timesteps=1000)).alpha_bars[99])
    assert f"{math.sqrt(alpha_bar):.4f}" in _latex(app) and "x_{100}" in _latex(app)


def test_timestep_schedule_and_T_follow_the_widgets(app):
    app.slider(key="fw_t").set_value(900).run()
    assert app.image[2].captions == ["x_t at t = 900"]
    app.radio(key="fw_schedule").set_value("cosine").run()
    app.number_input(key="fw_T").set_value(100).run()
    assert not app.exception
    assert app.slider(key="fw_t").value == 100 and app.slider(key="fw_t").max == 100  # clamped to the new T
    alpha_bar = float(NoiseScheduler(ScheduleConfig(timesteps=100, schedule="cosine")).alpha_bars[99])
    assert f"{alpha_bar:.4g}" in _latex(app)
    assert app.image[3].captions[-1] == "t = 100"


def test_random_image_and_pixel_range(app):
    app.button[0].click().run()  # "Random image"
    index = app.number_input(key="fw_index").value
    assert app.image[0].captions == [f"x₀ (image {index})"]
    app.radio(key="fw_range").set_value("unit").run()
    assert not app.exception and len(app.image) == 4
