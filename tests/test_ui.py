"""The web UI (``selfcascade ui``): its runner without a browser, then the page itself in headless Chromium.

The browser tests start the real server (``python -m selfcascade.cli ui``) on the embedded model and drive
Debian's Chromium through its chromedriver; without them they skip (set SELFCASCADE_REQUIRE_BROWSER=1, as
.ci/run does, to fail instead). SELFCASCADE_UI_SCREENSHOT names where the page's screenshot goes (default: the
test's tmp folder).
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from selfcascade.io import parameters_text
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.ui.runner import ModelPool, Request, Stopped, preset_size, run_modes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1600")
PROMPT = "red apple"


def load_on_cpu(name: str) -> SelfCascadePipeline:
    return SelfCascadePipeline.from_pretrained(name, device="cpu")


@pytest.fixture(scope="module")
def cascade() -> SelfCascadePipeline:
    return ModelPool(load_on_cpu).get("embedded")[0]


def small(cascade: SelfCascadePipeline) -> int:
    """4x the base's pixels: the smallest size every mode of the cascade accepts."""
    return cascade.backbone.base_size[0] * 2


def request(cascade: SelfCascadePipeline, modes: list[str], **kwargs) -> Request:
    return Request(PROMPT, small(cascade), small(cascade), modes, seed=7, steps=3, **kwargs)


# ------------------------------------------------------------------------------------------------ the runner
def test_presets_scale_the_base_pixels_at_each_aspect():
    assert [preset_size((32, 32), 8, f, "1:1") for f in (4, 16, 64)] == [(64, 64), (128, 128), (256, 256)]
    h, w = preset_size((512, 512), 64, 16, "16:9")
    assert (h % 64, w % 64) == (0, 0) and w > h
    assert abs(h * w / (16 * 512 * 512) - 1) < 0.1 and abs(w / h - 16 / 9) < 0.1
    assert preset_size((128, 128), 64, 4, "3:4") == (320, 192)  # sides rounded apart: 295.6 x 221.7
    with pytest.raises(ValueError, match="aspect must be one of"):
        preset_size((32, 32), 8, 4, "5:4")


def test_run_modes_matches_the_pipeline_and_writes_the_cli_png_chunk(cascade, tmp_path):
    req = request(cascade, ["direct", "tuning-free"], negative_prompt="blurry")
    results = list(run_modes(cascade, threading.Lock(), req, tmp_path, threading.Event()))
    assert [r.mode for r in results] == ["direct", "tuning-free"] and all(r.error is None for r in results)
    for r in results:
        out = cascade(PROMPT, req.height, req.width, mode=r.mode, negative_prompt="blurry", num_inference_steps=3,
                      seed=7, progress=False)
        png = Image.open(r.path)
        assert png.text["parameters"] == parameters_text(out.settings, 7)
        assert json.loads(png.text["selfcascade"])["seed"] == 7
        assert png.tobytes() == out.images[0].tobytes()  # one seed for every mode, the pipeline's own result
        assert r.stage_sizes == list(cascade.plan(req.height, req.width, r.mode).stages) and r.seconds > 0
    tuning_free = results[1]
    assert len(tuning_free.stage_paths) == len(tuning_free.stage_sizes) - 1 >= 1
    assert Image.open(tuning_free.stage_paths[0]).size[::-1] == tuning_free.stage_sizes[0]


def test_a_mode_that_refuses_its_settings_reports_it_and_the_others_run(cascade, tmp_path):
    req = request(cascade, ["hires-fix", "tuned", "tuning-free"], K=200, bank=str(tmp_path / "no-such-bank"))
    results = {r.mode: r for r in run_modes(cascade, threading.Lock(), req, tmp_path, threading.Event())}
    assert "takes strength" in results["hires-fix"].error and results["hires-fix"].path is None
    assert "no-such-bank" in results["tuned"].error
    assert results["tuning-free"].error is None and results["tuning-free"].path.is_file()


@pytest.mark.parametrize("change, message", [
    (lambda side: dict(height=side // 4, width=side // 4), "fewer pixels than the base size"),
    (lambda side: dict(height=side * 32, width=side * 32), "above the limit"),
    (lambda side: dict(modes=[]), "choose at least one mode"),
    (lambda side: dict(prompt=" "), "type a prompt"),
])
def test_refused_requests_raise_the_cli_message_before_sampling(cascade, tmp_path, change, message):
    req = replace(request(cascade, ["tuning-free"]), **change(small(cascade)))
    with pytest.raises(ValueError, match=message):
        next(run_modes(cascade, threading.Lock(), req, tmp_path, threading.Event()))
    assert not list(tmp_path.iterdir())


def test_progress_reports_every_stage_and_stop_ends_the_run_at_the_next_step(cascade, tmp_path):
    steps: list[tuple[str, int, int, int]] = []
    report = lambda mode, stage, sizes, step, total: steps.append((mode, stage, step, total))  # noqa: E731
    list(run_modes(cascade, threading.Lock(), request(cascade, ["tuning-free"]), tmp_path, threading.Event(), report))
    finals = {stage: (step, total) for _, stage, step, total in steps}
    assert sorted(finals) == [0, 1] and finals[0] == (3, 3) and finals[1][0] == finals[1][1] >= 1

    stop = threading.Event()
    seen: list[int] = []
    def stop_after_first(mode, stage, sizes, step, total):  # noqa: E306
        seen.append(step)
        stop.set()
    with pytest.raises(Stopped, match="direct"):
        list(run_modes(cascade, threading.Lock(), request(cascade, ["direct", "tuning-free"]), tmp_path / "x", stop,
                       stop_after_first))
    assert seen == [1] and not (tmp_path / "x").exists()


def test_model_pool_loads_once_and_refuses_video_models():
    pool = ModelPool(load_on_cpu)
    assert pool.get("embedded") is pool.get(" embedded ")
    with pytest.raises(ValueError, match="makes clips"):
        pool.get("embedded-video")
    with pytest.raises(ValueError, match="give a model"):
        pool.get("")


def test_cli_registers_ui_without_importing_gradio():
    code = ("import sys; from selfcascade.cli import build_parser; a = build_parser().parse_args(['ui']); "
            "print(a.host, a.port, a.share, 'gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["127.0.0.1", "7860", "False", "False"]


def test_page_shows_errors_verbatim_and_slides_between_any_two_images(tmp_path):
    pytest.importorskip("gradio", reason="the page needs gradio: pip install -e '.[ui]'")
    from selfcascade.ui.app import error_text, labelled_images, slider_pair
    from selfcascade.ui.runner import ModeResult

    assert error_text("pass max_ratio (`--max-ratio`)") == r"error: pass max\_ratio (\`--max-ratio\`)"
    for name, size, colour in (("base", 32, "red"), ("final", 64, "blue"), ("direct", 64, "green")):
        Image.new("RGB", (size, size), colour).save(tmp_path / f"{name}.png")
    results = [ModeResult("tuning-free", 1.0, tmp_path / "final.png", [tmp_path / "base.png"], [(32, 32), (64, 64)]),
               ModeResult("direct", 1.0, tmp_path / "direct.png", [], [(64, 64)]), ModeResult("tuned", 0.1, error="no bank")]
    images = labelled_images(results)
    assert list(images) == ["tuning-free", "direct", "tuning-free stage 0 (32x32)"]
    left, right = slider_pair(images, "tuning-free stage 0 (32x32)", "direct")
    assert left.size == right.size == (64, 64) and left.getpixel((63, 63)) == (255, 0, 0)
    assert slider_pair(images, "tuned", "direct") is None


# ----------------------------------------------------------------------------------------------- the browser
def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[ui,test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install chromium chromium-driver (Debian) for the browser tests"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``selfcascade ui`` in a subprocess, on a free port; yields (url, output folder)."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("SELFCASCADE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SELFCASCADE_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    out_dir = tmp_path_factory.mktemp("ui-outputs")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfcascade.cli", "ui", "--port", str(port), "--device", "cpu",
                             "--output-dir", str(out_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, log, deadline = f"http://127.0.0.1:{port}", [], time.monotonic() + 120
    while url not in "".join(log):
        try:
            log.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            proc.kill()
            pytest.fail("selfcascade ui did not start in 120 s:\n" + "".join(log))
    yield url, out_dir
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: str, condition, timeout: float = 90.0):
    """Poll ``condition`` until it is truthy (its value is returned) or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def text(driver, element_id: str) -> str:
    """The element's visible text; empty while the page has not rendered it."""
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.ID, element_id))


def open_page(driver, url: str, steps: int, preset: str | None = None, modes: tuple[str, ...] = ()) -> None:
    """Load the page, type the prompt, set the steps, pick a size preset and (if given) exactly these modes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    wait_for("the model's base size", lambda: "base" in text(driver, "model-info"), 60)
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    set_number(driver, "#steps input[type=number]", steps)
    choice = driver.find_element(By.XPATH, f"//*[@id='preset']//label[contains(., '{preset}')]") if preset else None
    if choice is not None and not choice.find_element(By.TAG_NAME, "input").is_selected():
        height = driver.find_element(By.CSS_SELECTOR, "#height input").get_attribute("value")
        choice.click()
        wait_for("the preset's height", lambda: driver.find_element(By.CSS_SELECTOR, "#height input")
                 .get_attribute("value") != height, 30)
    for box in driver.find_elements(By.CSS_SELECTOR, "#modes label") if modes else ():
        if (box.text.strip() in modes) != box.find_element(By.TAG_NAME, "input").is_selected():
            box.click()
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(Keys.TAB)


def set_number(driver, selector: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def result_images(driver) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, "#results img"))


def test_page_generates_compares_and_shows_refusals(server, browser):
    from selenium.webdriver.common.by import By

    url, out_dir = server
    open_page(browser, url, steps=3)
    start = time.monotonic()
    browser.find_element(By.ID, "generate").click()
    wait_for("both modes' images", lambda: result_images(browser) == 2)
    print(f"\nclick to images (direct + tuning-free, 4x preset, 3 steps): {time.monotonic() - start:.1f} s")
    status = wait_for("the timings table", lambda: "tuning-free" in text(browser, "status") and text(browser, "status"))
    pngs = sorted(out_dir.glob("*.png"))
    assert sorted(p.name.split("-", 4)[-1] for p in pngs) == ["direct.png", "tuning-free-stage0.png", "tuning-free.png"]
    assert all(p.name in status for p in pngs if "stage" not in p.name)
    assert "Steps: 3" in Image.open(pngs[0]).text["parameters"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#stages img")) == 2  # tuning-free's two stages
    assert len(browser.find_elements(By.CSS_SELECTOR, "#slider img")) == 2
    links = {a.get_attribute("download"): a.get_attribute("href")
             for a in browser.find_elements(By.CSS_SELECTOR, "#files a[download]")}
    assert sorted(links) == [p.name for p in pngs]
    with urllib.request.urlopen(links[pngs[0].name]) as download:  # served as written: the chunk survives
        assert Image.open(io.BytesIO(download.read())).text["parameters"] == Image.open(pngs[0]).text["parameters"]
    shot = Path(os.environ.get("SELFCASCADE_UI_SCREENSHOT") or out_dir / "ui-test.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    browser.find_element(By.ID, "reuse-seed").click()
    seed = re.search(r"seed (\d+)", status).group(1)
    wait_for("the last seed back in the seed box", lambda: browser.find_element(By.CSS_SELECTOR, "#seed input")
             .get_attribute("value") == seed, 10)

    refused = int(browser.find_element(By.CSS_SELECTOR, "#height input").get_attribute("value")) * 16  # 1024x pixels
    set_number(browser, "#height input", refused)
    set_number(browser, "#width input", refused)
    browser.find_element(By.ID, "generate").click()
    wait_for("the CLI's error in the page", lambda: f"error: {refused}x{refused} is 1024x the base model's" in
             text(browser, "status"), 30)
    assert "above the limit of 256x" in text(browser, "status")
    assert browser.find_element(By.CSS_SELECTOR, "#preset input[value=custom]").is_selected()
    browser.find_element(By.XPATH, "//*[contains(@class, 'label-wrap')][contains(., 'this session')]").click()
    wait_for("this session's history", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#history img")) == 2, 10)


def test_a_second_tab_waits_in_the_queue_and_stop_lets_it_run(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    open_page(browser, url, steps=150, preset="16x", modes=("direct",))  # long enough to be caught running
    browser.find_element(By.ID, "generate").click()
    first = browser.current_window_handle
    wait_for("the first tab's progress", lambda: "steps" in text(browser, "results"), 60)

    browser.switch_to.new_window("tab")
    open_page(browser, url, steps=3)
    browser.find_element(By.ID, "generate").click()
    queued = wait_for("the second tab's queue position", lambda: "queue" in text(browser, "results") and
                      text(browser, "results"), 30)
    print(f"\nsecond tab while the first runs: {queued.splitlines()[0]}")
    assert "queue: 1/1" in queued and result_images(browser) == 0

    browser.switch_to.window(first)
    browser.find_element(By.ID, "stop").click()
    wait_for("the first tab stopped", lambda: "stopped during direct" in text(browser, "status"), 60)
    browser.switch_to.window(browser.window_handles[-1])
    wait_for("the second tab's images", lambda: result_images(browser) == 2, 60)
    browser.close()
    browser.switch_to.window(first)
