"""Dashboard, step 10: the Reverse page's class picker, guidance slider, per-class grid and guidance
explorer on a tiny conditional run; nothing of it on an unconditional run; the Train form's
conditional options."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO, copy_run, generate, tiny_config
from core.store import runs
from core.evaluation import classifier as clf
from dashboard.guidance import tradeoff_figure
from dashboard.state import job_manager

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def cond_app(tmp_path, monkeypatch, trained_runs) -> AppTest:
    config = tiny_config(ema_decay=0.9)
    config = replace(config, model=replace(config.model, num_classes=10))
    copy_run(trained_runs(config, "cond"), tmp_path / "runs", "cond")  # trained once per session
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert not at.exception
    at.selectbox(key="rev_sampler").set_value("ddim").run()
    at.number_input(key="rev_steps").set_value(3).run()
    return at



def test_pick_sneaker_at_guidance_3(cond_app):
    at = cond_app
    assert at.slider(key="rev_guidance").value == 3.0  # the book's γ for a run trained with label dropout
    assert at.number_input(key="rev_n").disabled  # one row per class: "Images per class" sets the count
    at.selectbox(key="rev_class").set_value(7).run()
    at.number_input(key="rev_n").set_value(4).run()
    done = generate(at)
    assert done["meta"]["labels"] == [7] * 4 and done["meta"]["guidance"] == 3.0
    assert done["result"].images.shape == (4, 1, 28, 28)
    assert any("class Sneaker · γ = 3" in m.value for m in at.markdown)


def test_one_row_per_class(cond_app):
    at = cond_app
    at.number_input(key="rev_per_class").set_value(2).run()
    done = generate(at)
    meta = done["meta"]
    assert meta["n"] == 20 and meta["ncol"] == 2 and meta["labels"] == sorted(meta["labels"])
    assert done["result"].images.shape == (20, 1, 28, 28)
    # The rows are labelled with their classes: the grid is wider than the bare 2-column grid by the margin.
    from dashboard.guidance import LABEL_PX, labelled_rows, row_names
    names = row_names(meta, "fashion_mnist")
    assert names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"]
    bare = np.zeros((100, 60), np.uint8)
    drawn = labelled_rows(bare, names)
    assert drawn.shape == (100, 60 + LABEL_PX) and drawn[:, :LABEL_PX].max() > 200  # the names are written


def test_gamma_0_caption_says_the_class_is_ignored(cond_app):
    at = cond_app
    at.selectbox(key="rev_class").set_value(7).run()
    at.number_input(key="rev_n").set_value(2)
    at.slider(key="rev_guidance").set_value(0.0).run()
    generate(at)
    text = " ".join(m.value for m in at.markdown)
    assert "the class is ignored" in text and "class Sneaker" not in text


def test_guidance_explorer_shows_the_same_seeds_at_four_scales(cond_app):
    at = cond_app
    at.selectbox(key="rev_class").set_value(7).run()
    at.button(key="rev_explore").click().run()
    assert not at.exception and not at.error
    captions = [img.captions[0] for img in at.image if img.captions and img.captions[0].startswith("γ")]
    assert captions == ["γ = 0 (class ignored)", "γ = 1", "γ = 3", "γ = 7"]


def test_unconditional_runs_have_no_class_picker(tiny_run, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tiny_run.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert not at.exception and not at.error
    assert not [w for w in at.selectbox if w.key == "rev_class"]
    assert not [w for w in at.slider if w.key == "rev_guidance"]
    # ... on a page that did render this run's controls, and still generates (without labels):
    # an empty or broken page would pass the two checks above
    assert at.selectbox(key="rev_run").value == "tiny" and at.selectbox(key="rev_sampler").value is not None
    at.selectbox(key="rev_sampler").set_value("ddim").run()
    at.number_input(key="rev_steps").set_value(3).run()
    at.number_input(key="rev_n").set_value(4).run()
    done = generate(at)
    assert not done["meta"].get("labels") and done["result"].images.shape == (4, 1, 28, 28)


def test_train_form_has_the_conditional_options(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/train.py").run()
    at.selectbox(key="train_preset").set_value("Improved + guidance (step 10)").run()
    assert at.selectbox(key="f_num_classes").value == 10
    assert at.number_input(key="f_label_dropout").value == 0.1
    assert at.selectbox(key="f_label_dropout_mode").value == "sample"
    assert at.text_input(key="f_run_name").value.startswith("improved-cfg-improved_unet-adamw-")
    at.selectbox(key="train_preset").set_value("Book + guidance (step 10)").run()
    assert at.selectbox(key="f_label_dropout_mode").value == "batch"
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    assert at.selectbox(key="f_num_classes").value == 0
    assert job_manager().job is None or not job_manager().job.alive


@pytest.mark.integration  # trains on real FashionMNIST images
def test_train_improved_cfg_from_the_form_with_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/train.py").run()
    at.selectbox(key="train_preset").set_value("Improved + guidance (step 10)").run()
    at.text_input(key="f_run_name").set_value("cfg-ui")
    for name, value in (("base_channels", 8), ("batch_size", 16), ("max_steps", 3), ("limit_images", 256),
                        ("timesteps", 20)):
        at.number_input(key=f"f_{name}").set_value(value)
    at.selectbox(key="f_device").set_value("cpu")
    at.button(key="train_button").click().run()
    assert "Started run **cfg-ui**" in at.success[0].value
    job = job_manager().job
    try:
        assert job.join(120), "the training job did not end in time"
    finally:
        job_manager().stop()
    config = runs.load_config(tmp_path / "runs" / "cfg-ui")
    assert config.model.num_classes == 10 and config.train.label_dropout == 0.1
    assert runs.run_info(tmp_path / "runs" / "cfg-ui").state == "finished"


def test_tradeoff_figure_plots_accuracy_against_distance_per_guidance():
    entries = [{"setting": f"dpmpp2m-20-g{g}", "guidance": float(g), "fd": fd, "conditional_accuracy": acc}
               for g, fd, acc in ((3, 4.0, 0.95), (0, 5.0, 0.5), (1, 4.5, 0.8))]
    fig = tradeoff_figure({"cfg": entries + [{"setting": "ddim-50", "fd": 3.0}], "plain": [{"setting": "x", "fd": 1}]})
    assert len(fig.data) == 1 and fig.data[0].name == "cfg · dpmpp2m-20"
    assert list(fig.data[0].x) == [5.0, 4.5, 4.0] and list(fig.data[0].text) == ["γ=0", "γ=1", "γ=3"]
    assert tradeoff_figure({"plain": [{"setting": "ddim-50", "fd": 3.0}]}) is None


def test_compare_page_shows_the_guidance_sweep(tiny_run, monkeypatch):
    entries = [{"setting": f"dpmpp2m-20-g{g}", "sampler": "dpmpp2m", "n": 1000, "guidance": float(g), "fd": fd,
                "conditional_accuracy": acc} for g, fd, acc in ((0, 5.0, 0.5), (3, 4.0, 0.95))]
    (tiny_run / "eval.json").write_text(json.dumps(entries))
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tiny_run.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception
    assert any("Guidance sweep" in c.value for c in at.caption)


def test_a_row_of_sneakers_from_the_shipped_run(monkeypatch):
    """The issue's journey on the shipped run: pick Sneaker and γ = 3, get sneakers (by the shipped classifier)."""
    monkeypatch.setenv("DDPM_RUNS_DIR", str(REPO / "checkpoints"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    at.selectbox(key="rev_run").set_value("demo-improved-cfg").run()
    at.selectbox(key="rev_sampler").set_value("dpmpp2m").run()
    at.number_input(key="rev_steps").set_value(20)
    at.selectbox(key="rev_class").set_value(7).run()
    at.number_input(key="rev_n").set_value(8)
    at.slider(key="rev_guidance").set_value(3.0).run()
    images = generate(at)["result"].images
    classifier = clf.load_classifier("fashion_mnist")
    predicted = classifier.model.eval()(torch.from_numpy(images)).argmax(1)
    assert (predicted == 7).float().mean() >= 0.75, predicted.tolist()
