"""The dashboard in a real browser: Debian's chromium, headless, driven by chromium-driver
through selenium, against a real ``vmbak server`` on loopback with a real repository.

It logs in, sees the disks (the failed job in red), opens a disk's timeline and charts,
browses a snapshot down to a file, downloads it and compares its bytes, downloads a folder
as a tar, starts a job and watches it finish. Screenshots of the main pages are saved to
``$VMBAK_ARTIFACTS`` (default ``$TMPDIR/vmbak-dashboard-screenshots``); the path is printed.
Any console message of level SEVERE (a JavaScript error, a failed load, a CSP refusal)
fails the test.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.xdist_group("dashboard")
FINAL = ("succeeded", "failed", "aborted", "interrupted")


def _artifacts() -> Path:
    d = Path(os.environ.get("VMBAK_ARTIFACTS") or Path(tempfile.gettempdir()) / "vmbak-dashboard-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def browser(tmp_path: Path):  # noqa: ANN201
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "profile.default_content_setting_values.automatic_downloads": 1,
                                           "safebrowsing.enabled": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver",
                            log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    driver.console = []  # type: ignore[attr-defined]
    yield driver
    driver.quit()


def _console(driver) -> None:  # noqa: ANN001
    """Fail on any SEVERE console entry since the last look."""
    entries = driver.get_log("browser")
    driver.console.extend(entries)
    severe = [e for e in entries if e.get("level") == "SEVERE"]
    assert not severe, f"browser console errors on {driver.current_url}: {severe}"


def _shot(driver, name: str) -> None:  # noqa: ANN001
    path = _artifacts() / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _wait_download(d: Path, name: str, timeout: float = 30) -> bytes:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        f = d / name
        if f.exists() and not any(p.suffix == ".crdownload" for p in d.iterdir()):
            return f.read_bytes()
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded: {sorted(p.name for p in d.iterdir())}")


def test_dashboard_in_a_browser(dashboard_server, browser) -> None:  # noqa: ANN001
    sp = dashboard_server.sp
    b = browser
    wait = WebDriverWait(b, 30)

    # ---- not logged in: the login page; a wrong token is refused, the admin token lets in
    b.get(sp.url + "/disk/main/db")
    wait.until(ec.presence_of_element_located((By.ID, "token")))
    _shot(b, "01-login")
    _console(b)  # the login page loads nothing that needs a login
    assert b.find_element(By.ID, "login-submit").value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    b.find_element(By.ID, "token").send_keys("not-the-token-0123456789")
    b.find_element(By.ID, "login-submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "login-error")))
    b.get_log("browser")  # the refused login answers 401: the browser logs that as an error, rightly
    b.find_element(By.ID, "token").send_keys(sp.admin)
    b.find_element(By.ID, "login-submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "snapshots")))  # back where we were going
    _console(b)

    # ---- overview: every disk, the failed job red
    b.get(sp.url + "/")
    rows = {r.get_attribute("data-disk"): r for r in b.find_elements(By.CSS_SELECTOR, "#disks tbody tr")}
    assert {"db", "web", "broken"} <= set(rows)
    assert "row-bad" in rows["broken"].get_attribute("class")
    assert "row-bad" not in rows["db"].get_attribute("class")
    assert "failed" in rows["broken"].text
    _shot(b, "02-overview")
    _console(b)

    # ---- a disk: the timeline with its chain, and the charts
    rows["db"].find_element(By.LINK_TEXT, "db").click()
    wait.until(ec.presence_of_element_located((By.ID, "snapshots")))
    trs = b.find_elements(By.CSS_SELECTOR, "#snapshots tbody tr")
    assert [t.find_element(By.CSS_SELECTOR, ".kind").text for t in trs] == ["differential", "incremental", "full"]
    assert len(b.find_elements(By.CSS_SELECTOR, "svg.chain .node")) == 3
    assert len(b.find_elements(By.CSS_SELECTOR, "svg.chain .edge.arc")) == 1  # the differential's line to the full
    for chart in ("c-stored", "c-ratio", "c-duration"):
        wait.until(lambda d, c=chart: d.find_elements(By.CSS_SELECTOR, f"#{c} canvas"))
    _shot(b, "03-disk")
    _console(b)

    # ---- a snapshot: browse to a file, download it, and a folder as a tar
    trs[0].find_element(By.CSS_SELECTOR, "a.mono").click()
    wait.until(ec.presence_of_element_located((By.ID, "files")))
    for d in ("disk/", "srv/", "data/"):
        wait.until(ec.element_to_be_clickable((By.LINK_TEXT, d))).click()
        wait.until(ec.presence_of_element_located((By.ID, "crumbs")))
    _shot(b, "04-files")
    row = b.find_element(By.CSS_SELECTOR, '#files tr[data-name="blob.bin"]')
    row.find_element(By.LINK_TEXT, "download").click()
    assert _wait_download(b.downloads, "blob.bin") == dashboard_server.files["srv/data/blob.bin"]
    b.find_element(By.ID, "download-dir").click()
    tar = tarfile.open(fileobj=io.BytesIO(_wait_download(b.downloads, "data.tar")))
    got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {"data/blob.bin": dashboard_server.files["srv/data/blob.bin"],
                   "data/report 2026.txt": dashboard_server.files["srv/data/report 2026.txt"]}
    _console(b)

    # ---- start a job and watch it finish (the run page polls its state)
    b.get(sp.url + "/jobs")
    _shot(b, "05-jobs")
    b.find_element(By.CSS_SELECTOR, 'tr[data-job="web"] button[data-action="backup"]').click()
    wait.until(ec.url_matches(r"/runs/\d+$"))
    # htmx swaps the run's card every second while it runs: an element read mid-swap is stale
    live = WebDriverWait(b, 120, ignored_exceptions=[StaleElementReferenceException])
    state = live.until(lambda d: (t := d.find_element(By.ID, "run-state").text) in FINAL and t)
    log = live.until(lambda d: d.find_element(By.ID, "run-log").text.strip())
    assert state == "succeeded", log
    _shot(b, "06-run")
    _console(b)

    # ---- the new snapshot is on the overview, and the run in the history
    b.get(sp.url + "/")
    web = b.find_element(By.CSS_SELECTOR, '#disks tr[data-disk="web"]')
    assert "succeeded" in web.text and "full" in web.text
    b.get(sp.url + "/runs")
    assert b.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    _shot(b, "07-runs")
    _console(b)
    print(f"screenshots in {_artifacts()}")
