"""The web page at ``/`` in a real browser: Debian's headless Chromium driven by Selenium against a
real ``reconserve serve`` process. Without chromium / chromedriver / selenium the tests skip with
the reason, or fail where ``RECONSERVE_REQUIRE_BROWSER=1`` (``.ci/run`` sets it after installing
them). Screenshots go to ``docs/screenshots/`` (``docs/guide.md`` shows them) with
``RECONSERVE_SCREENSHOTS=1``: ``RECONSERVE_SCREENSHOTS=1 make test`` refreshes them."""
import base64
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.server import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow

#: Where the screenshots go: ``docs/screenshots/`` (what the docs show) with
#: ``RECONSERVE_SCREENSHOTS=1``; a scratch folder otherwise, so a test run leaves the checkout clean.
SHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("RECONSERVE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "reconserve-screenshots")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[dev])"
    if CHROMIUM is None or DRIVER is None:
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def downloads():
    path = Path(tempfile.mkdtemp(prefix="reconserve-downloads-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(downloads):
    why = _missing()
    if why:
        if os.environ.get("RECONSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RECONSERVE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="reconserve-chromium-")
    # headless as root on a machine without network: no sandbox, no background connections
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1440,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------- page helpers
def by_id(driver, id_):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, id_)


def css(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, selector)


def wait(driver, pred, timeout=180.0, what="the page"):
    """Until ``pred(driver)``; an element replaced by a redraw meanwhile is looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: pred(d), message=f"waiting for {what}")


def open_page(driver, url, model):
    driver.get(url + "/")
    wait(driver, lambda d: len(by_id(d, "model").find_elements("tag name", "option")) > 1, 60, "the models")
    choose(driver, "model", model)
    wait(driver, lambda d: css(d, "body").get_attribute("data-model") == model, 30, f"{model}'s forms")


def choose(driver, id_, value):
    from selenium.webdriver.support.ui import Select
    Select(by_id(driver, id_)).select_by_value(value)


def set_value(element, value):
    element.clear()
    element.send_keys(str(value))


def upload(driver, path):
    by_id(driver, "obs-file").send_keys(str(path))
    wait(driver, lambda d: Path(path).name in by_id(d, "obs-summary").text, 10, "the file to be read")


def job_status(driver):
    el = by_id(driver, "job-status")
    return el.get_attribute("data-job"), el.get_attribute("data-status")


def npy_file(tmp_path, name, array) -> Path:
    path = tmp_path / name
    np.save(path, np.asarray(array, dtype=np.float32))
    return path


def decode(field: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(field["npy"])), allow_pickle=False)


def shoot(driver, name, top):
    """A screenshot with the element ``top`` at the top of the window."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("arguments[0].scrollIntoView()", by_id(driver, top))
    driver.save_screenshot(str(SHOTS / name))


# ----------------------------------------------------------------------------- tests
def test_reconstruct_with_drawn_mask_progress_and_download(browser, server, downloads, tmp_path):
    """phantom-64 inpainting: the truth uploaded as .npy, the mask drawn in the page, dps with
    few steps; progress advances through intermediate steps, the panels appear, and the mean
    downloaded from the page equals the API's result."""
    open_page(browser, server, "phantom-64")
    assert "how good it is" in by_id(browser, "card").text.lower()
    upload(browser, ROOT / "docs" / "examples" / "phantom-truth.npy")
    choose(browser, "operator-kind", "inpainting")
    css(browser, "#operator-params button").click()  # Draw mask
    wait(browser, lambda d: by_id(d, "mask-dialog").is_displayed(), 10, "the mask dialog")
    by_id(browser, "mask-random").click()
    by_id(browser, "mask-save").click()
    assert "% ones" in css(browser, "#operator-params [role=status]").text
    choose(browser, "method-name", "dps")
    set_value(css(browser, "#method-params [name=steps]"), 60)
    set_value(by_id(browser, "noise-sigma"), 0.02)
    shoot(browser, "web-page-forms.png", "h-model")
    by_id(browser, "submit").click()
    seen = set()
    def progressed(d):
        seen.add(int(float(by_id(d, "progress").get_attribute("value"))))
        return job_status(d)[1] in ("succeeded", "failed", "cancelled")
    wait(browser, progressed, 300, "the job to finish")
    job_id, status = job_status(browser)
    assert status == "succeeded", by_id(browser, "error").text
    assert any(0 < s < 60 for s in seen), f"no intermediate progress seen: {sorted(seen)}"
    wait(browser, lambda d: css(d, "#panel-mean canvas") and css(d, "#panel-server img"), 60, "the result")
    assert css(browser, "#panel-std canvas") and css(browser, "#panel-sample canvas")
    shoot(browser, "web-page-result.png", "h-run")
    css(browser, f"#downloads button[data-path='/v1/jobs/{job_id}/result?format=npy&field=mean']").click()
    target = downloads / f"{job_id}-mean.npy"
    wait(browser, lambda d: target.exists() and target.stat().st_size > 0, 30, "the download")
    time.sleep(0.3)
    api = httpx.get(f"{server}/v1/jobs/{job_id}/result", timeout=30).json()
    np.testing.assert_array_equal(np.load(target), decode(api["mean"]))


def test_bad_file_shows_the_api_message(browser, server, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"this is not an array at all")
    open_page(browser, server, "grf-32")
    upload(browser, bad)
    by_id(browser, "submit").click()
    wait(browser, lambda d: by_id(d, "error").is_displayed(), 60, "the error")
    shown = by_id(browser, "error").text
    r = httpx.post(f"{server}/v1/jobs", files={"observation": ("bad.npy", bad.read_bytes())}, data={
        "request": '{"model": "grf-32", "operator": {"kind": "identity"}, "observation": {"file": "observation"},'
                   ' "noise_sigma": 0, "num_samples": 2, "seed": 0, "return": ["mean", "std", "samples"]}'})
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert f"{r.status_code} {err['code']}: {err['message']}" == shown
    shoot(browser, "web-page-error.png", "error")


def test_cancel(browser, server, tmp_path):
    open_page(browser, server, "phantom-64")
    upload(browser, ROOT / "docs" / "examples" / "phantom-truth.npy")
    choose(browser, "operator-kind", "identity")
    choose(browser, "method-name", "dps")
    set_value(css(browser, "#method-params [name=steps]"), 3000)
    by_id(browser, "submit").click()
    wait(browser, lambda d: job_status(d)[1] == "running", 120, "the job to run")
    by_id(browser, "cancel").click()
    wait(browser, lambda d: job_status(d)[1] == "cancelled", 120, "the job to be cancelled")
    job_id = job_status(browser)[0]
    assert httpx.get(f"{server}/v1/jobs/{job_id}", timeout=30).json()["status"] == "cancelled"


def test_volume_slice_slider(browser, server, tmp_path):
    from selenium.webdriver.common.keys import Keys
    rng = np.random.default_rng(0)
    volume = npy_file(tmp_path, "volume.npy", rng.standard_normal((3, 1, 32, 32)) * np.array([1, 3, 9])[:, None, None, None])
    open_page(browser, server, "grf-32")
    upload(browser, volume)
    choose(browser, "operator-kind", "identity")
    choose(browser, "method-name", "fast")
    set_value(css(browser, "#method-params [name=steps]"), 5)
    by_id(browser, "submit").click()
    wait(browser, lambda d: job_status(d)[1] in ("succeeded", "failed"), 180, "the job")
    assert job_status(browser)[1] == "succeeded", by_id(browser, "error").text
    wait(browser, lambda d: by_id(d, "slice-field").is_displayed(), 30, "the slice slider")
    def mean():  # (the slice it shows, its pixels), read at once: a redraw replaces the canvas
        return tuple(browser.execute_script(
            "const c = document.querySelector('#panel-mean canvas'); return [c.dataset.slice, c.toDataURL()]"))
    slice0, before = mean()
    assert slice0 == "0"
    by_id(browser, "slice").send_keys(Keys.ARROW_RIGHT)
    wait(browser, lambda d: mean()[0] == "1", 10, "slice 1")
    assert mean()[1] != before
    wait(browser, lambda d: "slice 1" in css(d, "#panel-server img").get_attribute("alt"), 30, "result.png?slice=1")
    shoot(browser, "web-page-volume.png", "h-results")


def test_demonstration_observation(browser, server):
    """A held-out phantom observed by the server's super-resolution operator: the page states its
    shape and submits it; a model without example data says so as the API words it."""
    open_page(browser, server, "phantom-64")
    css(browser, "input[name=obs-source][value=demo]").click()
    choose(browser, "operator-kind", "super_resolution")
    set_value(css(browser, "#operator-params [name=factor]"), 4)
    by_id(browser, "demo-make").click()
    wait(browser, lambda d: "[1, 16, 16]" in by_id(d, "obs-summary").text, 60, "the demonstration")
    choose(browser, "method-name", "fast")
    set_value(css(browser, "#method-params [name=steps]"), 5)
    by_id(browser, "submit").click()
    wait(browser, lambda d: job_status(d)[1] in ("succeeded", "failed"), 180, "the job")
    assert job_status(browser)[1] == "succeeded", by_id(browser, "error").text
    open_page(browser, server, "grf-32")
    css(browser, "input[name=obs-source][value=demo]").click()
    by_id(browser, "demo-make").click()
    wait(browser, lambda d: by_id(d, "error").is_displayed(), 30, "the error")
    assert by_id(browser, "error").text.startswith("422 no_examples: model grf-32 has no example data")


def test_api_key_and_png_upload(browser):
    """A server that requires a key: the page shows the API's 401 as worded, then works once the
    key is typed (the catalogue, a job from a PNG upload, its result and picture)."""
    from selenium.webdriver.common.keys import Keys
    proc, url = start_server({"RECONSERVE_API_KEYS": "page-test-key"})
    try:
        browser.get(url + "/")
        wait(browser, lambda d: by_id(d, "error").is_displayed(), 60, "the 401")
        err = httpx.get(f"{url}/v1/models", timeout=30).json()["error"]
        assert by_id(browser, "error").text == f"401 {err['code']}: {err['message']}"
        by_id(browser, "api-key").send_keys("page-test-key", Keys.TAB)
        wait(browser, lambda d: len(by_id(d, "model").find_elements("tag name", "option")) > 1, 60, "the models")
        assert not by_id(browser, "error").is_displayed()
        choose(browser, "model", "phantom-64")
        wait(browser, lambda d: css(d, "body").get_attribute("data-model") == "phantom-64", 30, "phantom-64's forms")
        assert "Shepp-Logan" in by_id(browser, "card").text
        upload(browser, ROOT / "docs" / "examples" / "phantom-inpainting-obs.png")
        assert "PNG [64, 64]" in by_id(browser, "obs-summary").text
        choose(browser, "method-name", "fast")
        set_value(css(browser, "#method-params [name=steps]"), 3)
        by_id(browser, "submit").click()
        wait(browser, lambda d: job_status(d)[1] in ("succeeded", "failed"), 180, "the job")
        assert job_status(browser)[1] == "succeeded", by_id(browser, "error").text
        wait(browser, lambda d: css(d, "#panel-observation canvas") and css(d, "#panel-server img"), 60, "the result")
    finally:
        stop_server(proc)
