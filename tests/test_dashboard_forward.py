"""Dashboard, Forward process page (the default page): works with no trained run at all."""
from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.config import ScheduleConfig
from core.diffusion.schedule import NoiseScheduler

pytestmark = pytest.mark.integration  # draws real FashionMNIST images from ./data

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "no-runs-here"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    return at


def _latex(at: AppTest) -> str:
    return "\n".join(block.value for block in at.latex)


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
    mantissa, exponent = f"{alpha_bar:.3e}".split("e")  # ~2e-7, written as 2.429 \times 10^{-7}
    assert rf"{float(mantissa):.4g} \times 10^{{{int(exponent)}}}" in _latex(app)
    assert app.image[3].captions[-1] == "t = 100"


def test_random_image_and_pixel_range(app):
    before = app.number_input(key="fw_index").value
    shown = app.image[0].proto.imgs[0].url
    app.button(key="fw_random").click().run()
    index = app.number_input(key="fw_index").value
    assert index != before  # the button must change the image (a no-op button fails here)
    assert app.image[0].captions == [f"x₀ (image {index})"]
    assert app.image[0].proto.imgs[0].url != shown  # a different picture, not only a different caption
    app.radio(key="fw_range").set_value("unit").run()
    assert not app.exception and len(app.image) == 4
    assert any("saturated" in c.value for c in app.caption)  # how values in x_t map to grey


def test_alpha_bar_T_is_shown_and_an_unscaled_short_schedule_is_warned_about(app):
    assert any(c.value.startswith("ᾱ_T = ") and "pure noise" in c.value for c in app.caption)
    assert not app.warning
    app.number_input(key="fw_T").set_value(50).run()
    assert not app.warning  # the linear betas scale with T: still noise at T = 50
    app.toggle(key="fw_scale").set_value(False).run()  # the book's betas with T = 50 stop far from noise
    assert app.warning and app.warning[0].value.startswith("ᾱ_T = ")


def test_formula_stays_readable_at_T(app):
    app.slider(key="fw_t").set_value(1000).run()
    latex = _latex(app)
    assert len(app.latex) == 2 and "SNR}(1000)" in latex
    assert "e-" not in latex and "e+" not in latex and r"\times 10^{" in latex  # 4e-05 as 4 × 10^{-5}


def test_plain_numbers():
    from dashboard.charts import plain_number

    assert plain_number(5.6e-11) == "5.6 × 10⁻¹¹" and plain_number(4.036e-05) == "4 × 10⁻⁵"
    assert plain_number(0.25) == "0.25" and plain_number(10_000) == "10,000"
