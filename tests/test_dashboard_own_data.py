"""Dashboard, own images: the Train form's folder field shows what a folder holds before training (or the
CLI's own refusal line), a form run gets the folder's DataConfig, and the Reverse page shows a colour
run's images in colour."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from conftest import REPO, generate
from test_dashboard_compare import values
from core.cli import main as cli
from core.data import cache as data_cache
from core.data.shapes import make_shapes_folder
from dashboard.state import form_memory, job_manager

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("DDPM_RUNS_DIR", str(path))
    monkeypatch.setenv(data_cache.ENV_CACHE_DIR, str(tmp_path / "cache"))
    form_memory().clear()
    yield path
    manager = job_manager()
    manager.stop()
    if manager.job is not None:
        assert manager.job.join(120)


def train_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/train.py").run()
    assert not at.exception
    return at


def choose_folder(at: AppTest, path: str) -> None:
    at.selectbox(key="f_dataset").set_value("folder").run()
    at.text_input(key="f_data_dir").set_value(path).run()
    assert not at.exception


def test_folder_field_shows_the_folder_and_the_run_gets_its_data(runs_dir, tmp_path):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=4, size=16)
    at = train_page()
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    assert at.selectbox(key="f_channels").value == 1  # FashionMNIST's own
    choose_folder(at, str(shapes))
    assert [s.value for s in at.success] == ["12 images, colour; sizes 16x16 (12)"]
    assert any(c.value == "3 classes: circle (4), square (4), triangle (4)" for c in at.caption)
    assert at.selectbox(key="f_channels").value == 3  # found colour
    assert at.selectbox(key="f_num_classes").options == ["none (unconditional)", "3 classes (step 10)"]
    at.selectbox(key="f_num_classes").set_value(3)
    at.number_input(key="f_image_size").set_value(16)
    at.toggle(key="f_hflip").set_value(True)
    at.number_input(key="f_max_steps").set_value(2)
    at.number_input(key="f_batch_size").set_value(8)
    at.text_input(key="f_run_name").set_value("shapes-form").run()
    at.button(key="train_button").click().run()
    assert not at.error, at.error[0].value
    assert job_manager().job.join(300)
    saved = json.loads((runs_dir / "shapes-form" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3 and saved["model"]["in_channels"] == 3
    data = saved["data"]
    assert {k: data[k] for k in ("dataset", "data_dir", "image_size", "channels", "hflip", "class_names")} == \
        {"dataset": "folder", "data_dir": str(shapes.resolve()), "image_size": 16, "channels": 3, "hflip": True,
         "class_names": ["circle", "square", "triangle"]}
    assert len(data["fingerprint"]) == 64


def _bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no pictures")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"")
    return {"blank": "", "a file": str(tmp_path / "texts" / "notes.txt"), "empty": str(tmp_path / "empty"),
            "no images": str(tmp_path / "texts"), "unreadable": str(tmp_path / "broken"),
            "missing": str(tmp_path / "nowhere")}


@pytest.mark.parametrize("case", ["blank", "a file", "empty", "no images", "unreadable", "missing"])
def test_a_bad_folder_shows_the_cli_line_and_creates_nothing(runs_dir, tmp_path, capsys, case):
    path = _bad_folders(tmp_path)[case]
    assert cli.main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", path,
                     "--image-size", "32", "--runs-dir", str(runs_dir), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1
    at = train_page()
    at.selectbox(key="train_preset").set_value("Tiny smoke test").run()
    choose_folder(at, path)
    at.number_input(key="f_image_size").set_value(32).run()
    assert [e.value for e in at.error] == [line.removeprefix("error: ")]   # the CLI's words, before training
    at.button(key="train_button").click().run()
    assert not at.exception
    assert [e.value for e in at.error][-1] == "Not started: " + line.removeprefix("error: ")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


@pytest.fixture
def colour_run(runs_dir, tmp_path):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=6, size=16, seed=1)
    assert cli.main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(shapes),
                     "--image-size", "16", "--max-steps", "4", "--batch-size", "8", "--runs-dir", str(runs_dir), "--name", "colour",
                     "--quiet"]) == 0
    return runs_dir / "colour"


@pytest.fixture
def shown(monkeypatch) -> list[bytes]:
    """The bytes of every image the page hands to Streamlit's (real, in-memory) media storage."""
    images: list[bytes] = []
    real = MemoryMediaFileStorage.load_and_get_id

    def keep(self, path_or_data, mimetype, kind, filename=None):
        if isinstance(path_or_data, bytes) and mimetype.startswith("image/"):
            images.append(path_or_data)
        return real(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    return images


def colour_spread(image_bytes: bytes) -> np.ndarray:
    """max - min over R, G, B per pixel: 0 everywhere for a grey picture."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        assert img.mode == "RGB", img.mode
        pixels = np.asarray(img).astype(int)
    return pixels.max(axis=2) - pixels.min(axis=2)


def test_reverse_page_shows_a_colour_run_in_colour(colour_run, shown):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert at.selectbox(key="rev_run").value == "colour"
    at.number_input(key="rev_n").set_value(4).run()
    generate(at)
    result = at.session_state["rev_result"]["result"]
    assert result.images.shape == (4, 3, 16, 16)
    at.slider(key="rev_frame").set_value(at.slider(key="rev_frame").max).run()
    assert any(img.captions and img.captions[0].startswith("x_0") for img in at.image)
    spread = colour_spread(shown[-1])
    assert spread.shape[1] >= 4 * 2 * 16   # scaled up for viewing
    assert (spread > 30).mean() > 0.05, "the images are grey"


def test_forward_page_offers_a_runs_own_images(colour_run, shown):
    at = AppTest.from_file(APP, default_timeout=120).run()  # the Forward process is the default page
    options = at.selectbox(key="fw_dataset").options
    assert options[0] == "FashionMNIST" and options[-1] == "run colour: folder shapes/ · 3 classes · 16×16×3"
    shown.clear()
    at.selectbox(key="fw_dataset").set_value("run:colour").run()
    assert not at.exception and not at.error
    assert at.number_input(key="fw_index").label == "Image index (0 to 17)"  # the run's 18 pictures
    assert [img.captions for img in at.image][0] == ["x₀ (image 0)"]
    x0 = colour_spread(shown[0])
    assert x0.shape[0] >= 4 * 16 and (x0 > 60).mean() > 0.1   # a bright coloured shape, scaled up


def test_runs_table_names_a_folder_run_with_its_shape_and_cost(colour_run):
    from core.bench.flops import model_cost
    from core.store import runs

    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception
    row = at.dataframe[0].value.set_index("run").loc["colour"]
    assert row["dataset"] == "folder shapes/ · 3 classes · 16×16×3"
    config = runs.load_config(colour_run)
    assert row["GFLOP/image"] == pytest.approx(model_cost(config.model, 16)["forward_gflop"])
    assert row["GFLOP/image"] < model_cost(config.model, 28)["forward_gflop"]   # counted at 16 px, not 28


def test_a_conditional_folder_run_is_guided_by_its_folder_names(runs_dir, tmp_path):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=6, size=16, seed=2)
    assert cli.main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(shapes), "--conditional",
                     "--image-size", "16", "--max-steps", "2", "--batch-size", "8", "--runs-dir", str(runs_dir),
                     "--name", "cond", "--quiet"]) == 0
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/reverse.py").run()
    assert at.selectbox(key="rev_class").options == ["All classes (one row per class)", "0 · circle", "1 · square",
                                                     "2 · triangle"]
    at.selectbox(key="rev_class").set_value(1).run()  # one class: "Images" applies (it is disabled for all classes)
    at.number_input(key="rev_n").set_value(2).run()
    generate(at)
    assert not at.exception
    assert at.session_state["rev_result"]["result"].images.shape == (2, 3, 16, 16)
    assert any("cond · " in m.value and "· class square · γ = " in m.value for m in at.markdown)


def test_compare_scores_a_folder_run_per_timestep_and_shows_its_samples_in_colour(colour_run, shown):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/compare.py").run()   # the only run is selected by default
    assert not at.exception
    assert [img.captions for img in at.image] == [["ImprovedUNet + AdamW · colour"]]
    assert (colour_spread(shown[-1]) > 30).mean() > 0.05
    at.button(key="cmp_buckets_button").click().run()   # on the run's own images (a folder has no test split)
    assert not at.exception and not at.error
    bucket = [c for c in at.get("plotly_chart") if c.proto.id.endswith("cmp_bucket_chart")]
    traces = json.loads(bucket[0].proto.spec)["data"]
    assert len(traces) == 1 and len(values(traces[0]["y"])) == 10 and all(y > 0 for y in values(traces[0]["y"]))


def test_a_conditional_preset_on_fashion_mnist_still_gets_its_ten_labels(runs_dir):
    at = train_page()
    at.selectbox(key="train_preset").set_value("Book + guidance (step 10)").run()
    assert at.selectbox(key="f_dataset").value == "fashion_mnist"  # presets leave the data source alone
    assert at.selectbox(key="f_num_classes").value == 10
    for field, value in (("max_steps", 1), ("limit_images", 16), ("batch_size", 8), ("base_channels", 8),
                         ("epochs", 1)):
        at.number_input(key=f"f_{field}").set_value(value)
    at.text_input(key="f_run_name").set_value("cfg-form").run()
    at.button(key="train_button").click().run()
    assert not at.error, at.error[0].value
    assert job_manager().job.join(300)
    saved = json.loads((runs_dir / "cfg-form" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 10 and saved["data"]["dataset"] == "fashion_mnist"
    assert (saved["data"]["image_size"], saved["data"]["channels"]) == (28, 1)


def test_skipped_files_are_named_as_the_cli_names_them(runs_dir, tmp_path, capsys):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=3, size=16)
    (shapes / "circle" / "zz-broken.png").write_bytes(b"\x89PNG cut short")
    assert cli.main(["data", "--dataset", "folder", "--data-dir", str(shapes), "--image-size", "16"]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    at = train_page()
    choose_folder(at, str(shapes))
    at.number_input(key="f_image_size").set_value(16).run()
    assert [s.value for s in at.success] == ["9 images, colour; sizes 16x16 (9)"]
    assert [w.value for w in at.warning] == [printed[-1]] and printed[-1].startswith("skipped 1 unreadable: "
                                                                                     "circle/zz-broken.png (")
