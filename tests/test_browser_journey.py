"""One real-browser journey through the dashboard: a real Streamlit server, Debian's headless Chromium.

Train the tiny preset, watch it finish, generate with DDIM on the Reverse page, scrub the frames,
download the final grid and check it is a PNG. A screenshot of every step goes to test-artifacts/.
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


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = dict(os.environ, DDPM_RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
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


def test_train_then_generate_then_download(server, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)

    def shot(page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"journey-{name}.png"), full_page=True)

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
            shot(page, "01-forward")

            # 2. Train the tiny preset.
            page.get_by_role("link", name="Train").click()
            expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").click()
            page.get_by_role("option", name="Tiny smoke test").click()
            expect(page.get_by_label("Timesteps T")).to_have_value("20")
            shot(page, "02-tiny-preset")
            page.get_by_role("button", name=re.compile(r"Train$")).click()

            # 3. Wait for the run to finish and its loss curve and sample grid to show.
            # (seconds on an idle 2-core machine; the cap leaves room for a busy CI runner)
            expect(page.get_by_text(re.compile(r"— finished"))).to_be_visible(timeout=300_000)
            expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
            expect(page.get_by_text("Latest sample grid", exact=False)).to_be_visible()
            expect(page.get_by_text("final", exact=True)).to_be_visible()  # the end-of-run grid's caption
            expect(page.get_by_role("button", name=re.compile("Stop$"))).to_have_count(0)
            shot(page, "03-trained")

            # 4. Generate with DDIM, a few steps.
            page.get_by_role("link", name="Reverse process").click()
            expect(page.get_by_role("heading", name="Reverse process")).to_be_visible()
            page.get_by_text("DDIM (fewer steps)").click()
            steps = page.get_by_role("spinbutton", name=re.compile(r"Steps \(1 to T = 20\)"))
            expect(steps).to_be_enabled()
            steps.fill("10")
            steps.press("Enter")
            expect(steps).to_have_value("10")
            page.get_by_role("button", name=re.compile("Generate")).click()
            frame_slider = page.locator('[data-testid="stSlider"]').filter(has_text="Frame").get_by_role("slider")
            expect(frame_slider).to_be_visible(timeout=60_000)
            expect(page.get_by_text(re.compile(r"Frame 0 of 10: t = 20"))).to_be_visible()
            shot(page, "04-generated")

            # 5. Scrub: move the frame slider with the keyboard.
            frame_slider.focus()
            for _ in range(4):
                frame_slider.press("ArrowRight")
            expect(page.get_by_text(re.compile(r"Frame 4 of 10: t = \d+"))).to_be_visible()
            shot(page, "05-scrubbed")

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
            shot(page, "06-downloaded")
        finally:
            browser.close()
