"""One real-browser journey through the dashboard: a real Streamlit server, Debian's headless Chromium.

Switch the optimizer and see the run name follow, train the tiny preset and watch it finish; on the
Reverse page switch between the tiny run and a shipped demo run and see each bring its own steps and
EMA setting, generate, scrub the frames, download the final grid; evaluate the tiny run from the Runs
page and see its figure on Compare; queue two tiny runs from the Train page and see the second start
after the first finished; train on a generated folder of coloured shapes from the Train form and see
colour images on the Reverse page (`own_images_step`). A screenshot of every step goes to test-artifacts/.
Skipped (not failed) only where no `chromium` is installed; `make test` installs it.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.work import sweeps

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make test installs Debian's chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


DEMO_RUN = "demo-improved-unet-adamw"  # shipped; has EMA weights and T = 1000
CFG_RUN = "demo-improved-cfg"          # shipped; class-conditional, trained with label dropout
SHIPPED_SWEEP = "blog-ablation"        # shipped; the blog's changes one at a time, scored
SEED_REPEAT = "improved-lr-seed1"      # shipped; the ablation's last step again with seed 1 (the spread)


def _seconds(text: str) -> float:
    """'1:05' or '0:07' or '1:02:03' as seconds."""
    parts = [int(p) for p in text.split(":")]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


@pytest.fixture
def server(tmp_path):
    from core.data.datasets import load_images
    from core.evaluation import classifier as clf

    port = _free_port()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for shipped in (DEMO_RUN, CFG_RUN):
        shutil.copytree(REPO / "checkpoints" / shipped, runs_dir / shipped)
    # the shipped ablation: its sweep folder and its runs, as the repository has them
    # the shipped ablation and its seed repeat: their sweep folders and runs, as the repository has them
    for sweep in (SHIPPED_SWEEP, SEED_REPEAT):
        shutil.copytree(REPO / "checkpoints" / "sweeps" / sweep, runs_dir / "sweeps" / sweep)
        for run in sweeps.load(REPO / "checkpoints", sweep)["runs"]:
            shutil.copytree(REPO / "checkpoints" / run["name"], runs_dir / run["name"])
    # A classifier fitted for a few steps (the same code path as the real one, seconds instead of minutes).
    classifiers = tmp_path / "classifiers"
    fitted = clf.fit(load_images("fashion_mnist", "train"), load_images("fashion_mnist", "test"),
                     clf.FitConfig(epochs=1, batch_size=64, max_steps=10))
    clf.save_classifier(fitted, clf.classifier_path("fashion_mnist", classifiers))
    env = dict(os.environ, DDPM_RUNS_DIR=str(runs_dir), OMP_NUM_THREADS="1",
               **{clf.ENV_CLASSIFIER_DIR: str(classifiers)})
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if proc.returncode not in (0, -15, None):
            print((tmp_path / "streamlit.log").read_text()[-4000:])


def test_train_then_generate_then_evaluate(server, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)

    def shot(page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"journey-{name}.png"), full_page=True)

    # A busy 2-core machine can take seconds to rerun a page after an input: wait longer than the default 5 s.
    expect.set_options(timeout=20_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500}, accept_downloads=True)
            page.set_default_timeout(30_000)

            # 1. The default page is the forward process: useful before any training.
            page.goto(server)
            # A cold start imports torch and reads the dataset: generous caps for a busy machine.
            expect(page.get_by_role("heading", name="Forward process")).to_be_visible(timeout=180_000)
            expect(page.get_by_text("x_t at t = 100")).to_be_visible(timeout=180_000)
            # Issue 22.9: only installed datasets are offered (this machine has FashionMNIST, not MNIST).
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Dataset").click()
            expect(page.get_by_role("option", name="FashionMNIST", exact=True)).to_have_count(1)
            expect(page.get_by_role("option", name="MNIST", exact=True)).to_have_count(0)
            page.keyboard.press("Escape")
            expect(page.get_by_text("--data-root")).to_have_count(0)
            shot(page, "01-forward")

            # 2. The run name follows the form: switch the optimizer, then train the tiny preset.
            page.get_by_role("link", name="Train").click()
            expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
            name_box = page.get_by_role("textbox", name="Run name")
            expect(name_box).to_have_value(re.compile(r"^quick-improved_unet-adamw-"))
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Optimizer").click()
            page.get_by_role("option", name="Adam", exact=True).click()
            expect(name_box).to_have_value(re.compile(r"^quick-improved_unet-adam-\d"))
            shot(page, "02-name-follows-optimizer")
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").click()
            page.get_by_role("option", name="Tiny smoke test").click()
            expect(page.get_by_label("Timesteps T")).to_have_value("20")
            expect(name_box).to_have_value(re.compile(r"^tiny-improved_unet-adamw-"))
            expect(page.get_by_text(re.compile(r"ᾱ_T = .*pure noise"))).to_be_visible()
            tiny_name = name_box.input_value()
            # Issue 22.6: an estimate before clicking Train.
            expect(page.get_by_text(re.compile(r"About \d+:\d\d here for 48 steps"))).to_be_visible()
            shot(page, "03-tiny-preset")
            # A second tab opened now starts from the last choice, and sees the run start without a reload.
            other = browser.new_page(viewport={"width": 1400, "height": 1000})
            other.set_default_timeout(30_000)
            other.goto(f"{server}/train")
            expect(other.get_by_role("textbox", name="Run name")).to_have_value(re.compile(r"^tiny-"))
            expect(other.get_by_label("Timesteps T")).to_have_value("20")
            page.get_by_role("button", name=re.compile(r"Train$")).click()
            expect(other.get_by_role("heading", name=re.compile(r"Run " + re.escape(tiny_name)))).to_be_visible(
                timeout=30_000)
            other.screenshot(path=str(ARTIFACTS / "journey-04b-second-tab.png"))
            other.close()

            # 3. Wait for the run to finish and its loss curve and sample grid to show.
            # (about 30 s on an idle 2-core machine; the cap leaves room for a busy CI runner)
            expect(page.get_by_text(re.compile(r"— finished"))).to_be_visible(timeout=300_000)
            expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
            expect(page.get_by_text("Latest sample grid", exact=False)).to_be_visible()
            expect(page.get_by_text("final", exact=True)).to_be_visible()  # the end-of-run grid's caption
            expect(page.get_by_role("button", name=re.compile("Stop$"))).to_have_count(0)
            # Issue 22.6: a stopped or finished run's images/s is its average: steps × batch ÷ training time.
            from core.store import runs as run_store
            last = run_store.read_metrics(tmp_path / "runs" / tiny_name)[-1]
            average = last["step"] * 32 / last["elapsed_s"]
            shown = float(page.locator('[data-testid="stMetric"]').filter(has_text="Images/s")
                          .locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))
            assert 0.5 * average <= shown <= 2 * average, (shown, average)
            shot(page, "04-trained")

            # 4. Reverse: each run brings its own steps and EMA setting, and keeps what the user set.
            page.get_by_role("link", name="Reverse process").click()
            expect(page.get_by_role("heading", name="Reverse process")).to_be_visible()

            def pick_run(label: str) -> None:
                page.locator('[data-testid="stSelectbox"]').filter(has_text=re.compile(r"^Run")).click()
                page.get_by_role("option", name=re.compile(re.escape(label))).click()

            ema = page.get_by_role("switch", name="EMA")
            pick_run(tiny_name)
            steps = page.get_by_role("spinbutton", name=re.compile(r"Steps \(1 to T = 20\)"))
            expect(steps).to_have_value("20")
            expect(ema).not_to_be_checked()  # the tiny preset trains without EMA
            steps.fill("10")
            steps.press("Enter")
            expect(steps).to_have_value("10")
            pick_run(DEMO_RUN)
            demo_steps = page.get_by_role("spinbutton", name=re.compile(r"Steps \(1 to T = 1000\)"))
            expect(demo_steps).to_have_value("20")
            expect(ema).to_be_checked()  # the demo run has EMA weights: on by default
            shot(page, "05-reverse-demo-run")
            pick_run(tiny_name)
            expect(steps).to_have_value("10")  # what the user set for the tiny run is kept
            expect(ema).not_to_be_checked()
            page.set_viewport_size({"width": 1400, "height": 900})  # issue 22.7: a laptop window
            page.get_by_role("button", name=re.compile("Generate")).click()
            frame_slider = page.locator('[data-testid="stSlider"]').filter(has_text="Frame").get_by_role("slider")
            expect(frame_slider).to_be_visible(timeout=60_000)
            # It opens on the finished images, and they and the scrubber fit the window without scrolling.
            expect(page.get_by_text(re.compile(r"Frame 10 of 10: the finished images"))).to_be_visible()
            expect(page.get_by_text(re.compile(re.escape(tiny_name) + r" · DPM-Solver\+\+\(2M\)( SDE)? 10 steps"))) \
                .to_be_visible()
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(500)
            final = page.locator('[data-testid="stImage"]').filter(has_text="x_0: the finished images").first
            for element in (final, frame_slider):
                box = element.bounding_box()
                assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 900, box
            # Labels on one line, the sampler name whole.
            label = page.get_by_text("Steps (1 to T = 20)", exact=True)
            assert label.bounding_box()["height"] < 30, label.bounding_box()
            page.screenshot(path=str(ARTIFACTS / "journey-06-generated.png"))  # the window as the user sees it

            # 5. Scrub: move the frame slider with the keyboard, back towards the noise.
            frame_slider.focus()
            for _ in range(4):
                frame_slider.press("ArrowLeft")
            expect(page.get_by_text(re.compile(r"Frame 6 of 10: t = \d+"))).to_be_visible()
            shot(page, "07-scrubbed")


            # 6. Download the final grid and check it is a real PNG.
            with page.expect_download() as download_info:
                page.get_by_role("button", name=re.compile(r"Final grid \(PNG\)")).click()
            download = download_info.value
            data = Path(download.path()).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                assert img.mode == "L" and img.width >= 4 * 28 and img.height >= 4 * 28
            assert download.suggested_filename.endswith(".png")

            # Issue 22.2: the demo run's default 20 steps first (this machine's recent work with that network
            # and batch), then DDPM over all 1000 steps: its estimate within 2x of the time it takes.
            pick_run(DEMO_RUN)
            images_box = page.get_by_role("spinbutton", name="Images", exact=True)
            images_box.fill("4")
            images_box.press("Enter")
            expect(images_box).to_have_value("4")
            page.get_by_role("button", name=re.compile("Generate")).click()
            expect(page.get_by_text(re.compile(re.escape(DEMO_RUN) + r" · DPM-Solver\+\+\(2M\) SDE 20 steps.*"
                                               r"generated in"))).to_be_visible(timeout=120_000)
            estimate = page.get_by_text(re.compile(r"^About \d+:\d\d here"))
            expect(estimate).to_contain_text("recent runs of the same work", timeout=60_000)
            few_step_estimate = estimate.inner_text()
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Sampler").click()
            page.get_by_role("option", name="DDPM", exact=True).click()
            expect(page.get_by_role("spinbutton", name=re.compile(r"Steps \(1 to T = 1000\)"))).to_be_disabled()
            expect(estimate).not_to_have_text(few_step_estimate, timeout=60_000)
            expect(estimate).to_contain_text("recent")  # scaled from the run just made, not a guess
            guessed = _seconds(re.search(r"About (\d+:\d\d(?::\d\d)?) here", estimate.inner_text()).group(1))
            expect(page.get_by_text("Sampler", exact=True).first).to_be_visible()
            page.get_by_role("button", name=re.compile("Generate")).click()
            done = page.get_by_text(re.compile(re.escape(DEMO_RUN) + r" · DDPM 1000 steps.*generated in"))
            expect(done).to_be_visible(timeout=400_000)
            took = float(re.search(r"generated in ([\d.]+) s", done.inner_text()).group(1))
            assert took / 2 <= guessed <= took * 2, (guessed, took)
            page.screenshot(path=str(ARTIFACTS / "journey-07b-ddpm-1000.png"))
            page.set_viewport_size({"width": 1400, "height": 1500})

            # 7. Evaluate the tiny run from the Runs page, in the background, with a time estimate.
            page.get_by_role("link", name="Runs").click()
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
            page.locator('[data-testid="stSelectbox"]').filter(has_text=re.compile(r"^Run")).first.click()
            page.get_by_role("option", name=re.compile(re.escape(tiny_name))).click()
            expect(page.get_by_text(re.compile(r"Estimated time here: about"))).to_be_visible()
            n_box = page.get_by_role("spinbutton", name="Images (N)")
            n_box.fill("64")
            n_box.press("Enter")
            expect(n_box).to_have_value("64")
            eval_steps = page.get_by_role("spinbutton", name=re.compile(r"Steps \(1 to 20\)"))
            eval_steps.fill("5")
            eval_steps.press("Enter")
            expect(eval_steps).to_have_value("5")
            shot(page, "08-evaluate-form")
            page.get_by_role("button", name=re.compile(r"Evaluate$")).click()
            banner = page.get_by_text(re.compile(r"^Evaluated " + re.escape(tiny_name)))
            expect(banner).to_be_visible(timeout=180_000)
            shot(page, "09-evaluated")
            # Issue 22.10: the banner goes with the next action; the table has the new figure.
            n_box.fill("32")
            n_box.press("Enter")
            expect(n_box).to_have_value("32")
            expect(banner).to_have_count(0)
            shot(page, "09b-runs-table")

            # 8. Its figure on Compare: the evaluations table and the steps-versus-quality chart.
            page.get_by_role("link", name="Compare").click()
            expect(page.get_by_role("heading", name="Compare")).to_be_visible()
            page.locator('[data-testid="stMultiSelect"]').click()
            page.get_by_role("option", name=re.compile(re.escape(tiny_name))).click()
            page.keyboard.press("Escape")
            expect(page.get_by_text("Steps versus quality", exact=True)).to_be_visible(timeout=60_000)
            expect(page.get_by_text(re.compile(r"N = 64, classifier"))).to_be_visible()
            # Issue 22.5: the demo run's figures were taken with the shipped classifier, the tiny run's with
            # this test's: one classifier at a time, never one silently mixed table.
            expect(page.get_by_text(re.compile(r"entries taken with another classifier are hidden"))).to_be_visible()
            page.get_by_text("Steps versus quality", exact=True).scroll_into_view_if_needed()
            page.wait_for_timeout(2000)
            shot(page, "10-compare")
            legend = page.locator('[data-testid="stPlotlyChart"] .legendtext')
            expect(legend.filter(has_text=re.compile(re.escape(tiny_name) + r" · DPM-Solver"))).to_have_count(1)

            # 9. Step 10: the shipped conditional run draws the class asked for, guided at the book's γ = 3.
            page.get_by_role("link", name="Reverse process").click()
            expect(page.get_by_role("heading", name="Reverse process")).to_be_visible()
            pick_run(CFG_RUN)
            images = page.get_by_role("spinbutton", name="Images", exact=True)
            expect(images).to_be_disabled()  # issue 22.8: one row per class: "Images per class" applies
            page.locator('[data-testid="stSelectbox"]').filter(has_text=re.compile(r"^Class")).click()
            page.get_by_role("option", name="7 · Sneaker").click()
            guidance = page.locator('[data-testid="stSlider"]').filter(has_text="Guidance").get_by_role("slider")
            expect(guidance).to_have_value("3")  # the book's γ is the run's default
            expect(images).to_be_enabled()
            images.fill("8")
            images.press("Enter")
            expect(images).to_have_value("8")
            page.get_by_role("button", name=re.compile("Generate")).click()
            expect(page.get_by_text(re.compile(re.escape(CFG_RUN) + r" · .*class Sneaker · γ = 3"))) \
                .to_be_visible(timeout=120_000)
            shot(page, "11-sneakers")

            # 10. The run queue: add two tiny runs from the Train page; they train one after the other.
            page.get_by_role("link", name="Train").click()
            expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").click()
            page.get_by_role("option", name="Tiny smoke test").click()
            expect(page.get_by_label("Timesteps T")).to_have_value("20")
            max_steps = page.get_by_label("Max steps (0 = no limit)")
            for queued_name in ("queued-one", "queued-two"):
                expect(max_steps).to_have_count(1, timeout=30_000)  # a rerun may briefly show two forms
                max_steps.fill("6")
                max_steps.press("Enter")
                expect(max_steps).to_have_value("6")
                name_box = page.get_by_role("textbox", name="Run name")
                name_box.fill(queued_name)
                name_box.press("Enter")
                expect(name_box).to_have_value(queued_name)
                page.get_by_role("button", name=re.compile(r"Add to queue$")).click()
                expect(page.locator('[data-testid="stAlert"]').filter(
                    has_text=re.compile(r"Queued run " + queued_name))).to_be_visible()
            shot(page, "12-queued")
            from core.work import queue as run_queue
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                entries = run_queue.read_queue(tmp_path / "runs").entries
                if [e.state for e in entries] == ["finished", "finished"]:
                    break
                time.sleep(1)
            first, second = run_queue.read_queue(tmp_path / "runs").entries
            assert (first.run, first.state, second.run, second.state) == \
                ("queued-one", "finished", "queued-two", "finished"), (first.error, second.error)
            assert first.ended_at <= second.started_at  # the second started after the first finished
            expect(page.get_by_text("Queue (0 waiting)")).to_be_visible(timeout=30_000)
            shot(page, "13-queue-done")

            # 11. Experiments leads with the answer (issue 22.3): each change's effect and its seed spread.
            page.get_by_role("link", name="Experiments").click()
            expect(page.get_by_role("heading", name="Experiments")).to_be_visible()
            expect(page.get_by_text("What each change did", exact=True)).to_be_visible(timeout=60_000)
            reading = page.locator('[data-testid="stAlert"]').filter(has_text="The largest improvement")
            expect(reading).to_contain_text("step 6, + EMA 0.999 (-60%)", timeout=60_000)
            expect(reading).to_contain_text("Also outside the seed spread: step 2, + ImprovedUNet (12 wide) (-42%)")
            expect(reading).to_contain_text("not measurable at this budget: step 3 (-1%)")
            expect(page.get_by_text(re.compile(r"Seed spread from .*improved-lr-seed1"))).to_be_visible()
            expect(page.get_by_text("Fréchet distance per run", exact=True)).to_be_visible()
            expect(page.get_by_role("button", name=re.compile("Results as CSV"))).to_be_visible()
            shot(page, "14-experiments")

            # 12. A new sweep (issue 22.1): a meaningless budget is refused before the click, the default
            # one gives runs longer than their warm-up, the page updates itself when they finish, a reload
            # stays on it, and the queue's own evaluation setting stays off.
            def choose(label: str, option: str) -> None:
                """Open a select box and pick an option; on a loaded machine a click during a rerun can
                miss, so open it again until the option shows (at most three tries)."""
                for attempt in range(3):
                    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
                    try:
                        page.get_by_role("option", name=option, exact=True).click(timeout=10_000)
                        return
                    except Exception:  # noqa: BLE001 - the list did not open: close whatever did, try again
                        page.keyboard.press("Escape")
                        if attempt == 2:
                            raise

            page.get_by_text("New sweep", exact=True).click()
            amount = page.get_by_role("spinbutton", name="Amount")
            expect(amount).to_be_visible()
            choose("Budget", "training images")
            amount.fill("20")
            amount.press("Enter")
            expect(page.get_by_text(re.compile(r"Not ready: .*under the minimum of 20"))).to_be_visible()
            choose("Budget", "optimizer steps")
            amount.fill("20")
            amount.press("Enter")
            expect(page.get_by_text("2 runs, 20 optimizer steps each.", exact=True)).to_be_visible()
            name_box = page.get_by_role("textbox", name="Name", exact=True)
            name_box.fill("opt-journey")
            name_box.press("Enter")
            score_n = page.get_by_role("spinbutton", name="Score at N")
            score_n.fill("32")
            score_n.press("Enter")
            expect(score_n).to_have_value("32")
            page.get_by_role("button", name=re.compile("Create and queue")).click()
            expect(page.locator('[data-testid="stAlert"]').filter(has_text="Sweep opt-journey")).to_be_visible()
            assert run_queue.read_queue(tmp_path / "runs").eval is None  # later runs are not scored for it
            for planned in sweeps.load(tmp_path / "runs", "opt-journey")["runs"]:
                config = run_store.load_config(tmp_path / "runs" / planned["name"])
                assert config.train.max_steps >= max(20, config.train.warmup_steps)
            expect(page.get_by_text(re.compile(r"^Not finished yet"))).to_be_visible()
            shot(page, "15-sweep-queued")
            # No reload: the page notices the runs finishing and scores appearing.
            expect(page.get_by_text(re.compile(r"^Not finished yet"))).to_have_count(0, timeout=600_000)
            shot(page, "16-sweep-finished")
            page.reload()
            expect(page.get_by_text("What each change did", exact=True)).to_be_visible(timeout=60_000)
            assert "sweep=opt-journey" in page.url
            expect(page.get_by_text(re.compile(r"^grid from tiny, 2 runs, 20 steps each"))).to_be_visible()
            rows = sweeps.results(tmp_path / "runs", sweeps.load(tmp_path / "runs", "opt-journey"))
            assert [r["state"] for r in rows] == ["finished", "finished"] and all(r["fd"] for r in rows), rows
            shot(page, "17-sweep-after-reload")

            # 13. Your own images: a folder from the Train form, colour images on the Reverse page.
            own_images_step(page, tmp_path, shot)
        finally:
            browser.close()


# -- own images (issue 20) ---------------------------------------------------------------------------------
def colour_share(png: bytes) -> float:
    """The share of pixels whose R, G, B differ by more than 30: 0 for a grey picture."""
    from PIL import Image
    import numpy as np

    with Image.open(io.BytesIO(png)) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 30).mean())


def own_images_step(page, tmp_path: Path, shot) -> None:
    """Train the tiny preset on a generated shapes folder from the Train form (the folder field shows what
    it found first), then generate with it on the Reverse page and see colour, not grey."""
    from playwright.sync_api import expect
    from core.data.shapes import make_shapes_folder

    shapes = make_shapes_folder(tmp_path / "shapes", per_class=12, size=16)
    page.get_by_role("link", name="Train").click()
    expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").click()
    page.get_by_role("option", name="Tiny smoke test").click()
    expect(page.get_by_label("Timesteps T")).to_have_value("20")
    page.locator('[data-testid="stSelectbox"]').filter(has_text=re.compile(r"^Data")).click()
    page.get_by_role("option", name="Image folder").click()
    folder_box = page.get_by_role("textbox", name="Image folder")
    folder_box.fill(str(tmp_path / "nowhere"))
    folder_box.press("Enter")
    expect(page.get_by_text(re.compile(r"is not allowed: no such folder"))).to_be_visible()
    shot(page, "18-own-folder-refused")
    folder_box.fill(str(shapes))
    folder_box.press("Enter")
    expect(page.get_by_text(re.compile(r"^36 images, colour"))).to_be_visible(timeout=60_000)
    expect(page.get_by_text("3 classes: circle (12), square (12), triangle (12)")).to_be_visible()
    size_box = page.get_by_role("spinbutton", name="Image size")
    size_box.fill("16")
    size_box.press("Enter")
    expect(size_box).to_have_value("16")
    max_steps = page.get_by_label("Max steps (0 = no limit)")
    expect(max_steps).to_have_count(1, timeout=30_000)  # a rerun may briefly show the old form beside the new
    max_steps.fill("6")
    max_steps.press("Enter")
    expect(max_steps).to_have_value("6")
    name_box = page.get_by_role("textbox", name="Run name")
    name_box.fill("own-shapes")
    name_box.press("Enter")
    expect(name_box).to_have_value("own-shapes")
    shot(page, "19-own-folder-form")
    page.get_by_role("button", name=re.compile(r"Train$")).click()
    expect(page.get_by_text(re.compile(r"Run own-shapes — finished"))).to_be_visible(timeout=300_000)
    shot(page, "20-own-folder-trained")

    page.get_by_role("link", name="Reverse process").click()
    expect(page.get_by_role("heading", name="Reverse process")).to_be_visible()
    page.locator('[data-testid="stSelectbox"]').filter(has_text=re.compile(r"^Run")).click()
    page.get_by_role("option", name=re.compile(r"own-shapes")).click()
    page.get_by_role("button", name=re.compile("Generate")).click()
    frame_slider = page.locator('[data-testid="stSlider"]').filter(has_text="Frame").get_by_role("slider")
    expect(frame_slider).to_be_visible(timeout=60_000)
    frame_slider.focus()
    frame_slider.press("End")
    expect(page.get_by_text(re.compile(r"^Frame \d+ of \d+: the finished images"))).to_be_visible()
    final = page.locator('[data-testid="stImage"]').filter(has_text="x_0: the finished images").locator("img").first
    expect(final).to_be_visible()
    final.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    shot(page, "21-own-folder-reverse")
    assert colour_share(final.screenshot(path=str(ARTIFACTS / "journey-21b-own-folder-x0.png"))) > 0.05, \
        "the own-folder run's images show grey on the Reverse page"
