"""The worklist in a real browser, on a real pipeline: dcmtk's storescu pushes two brain MR studies (made now from
the shared images) to ``dicom-triage serve``, whose worker classifies them with a small installed model; the web
server runs beside it on the same data directory. Headless Debian Chromium, driven by Playwright, logs in, sees
the classified studies, opens one, toggles the Grad-CAM heat map, confirms one result and corrects the other, and
sees the review states change. Screenshots go to the test's tmp dir and ``artifacts/web/``.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from pydicom import dcmread
from sqlalchemy import select

from dicom_factory import storescu, write_files
from dicom_io.sr import read_classification_sr
from dicom_io.synthesis import mr_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment, wait_for
from test_web_helpers import PASSWORD, XSS_NAME, add_users, images, install_model, make_database, make_settings
from worker.db import Database, SrDocument

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_SECONDS = 180  # TensorFlow's import is slow on a loaded 2-core machine

pytestmark = pytest.mark.slow  # about 2 minutes on a loaded 2-core machine


def web_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/login", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("browser")
    settings = make_settings(tmp)
    database = make_database(settings)
    add_users(database)
    database.dispose()
    install_model(settings)
    dicom_port, web_port = free_port(), free_port()
    env = triage_environment(settings.models_dir)
    serve = Child(triage_command("serve", "--data-dir", str(settings.data_dir), "--dicom-port", str(dicom_port),
                                 "--web-port", str(web_port)), env, name="serve")
    url = f"http://127.0.0.1:{web_port}"
    try:
        serve.wait_for_line(serve_ready, STARTUP_SECONDS)
        wait_for(lambda: web_up(url), STARTUP_SECONDS, "web", serve, interval=0.25, alive=True)
        for index, (cls, name) in enumerate([("glioma", "Alpha^Ann"), ("notumor", XSS_NAME)]):
            # Not post-contrast: the untrained model's class is chance, and a pituitary call on an axial
            # post-contrast series is indeterminate, with no heat map (worker.decoding.finding_caveats).
            datasets = mr_series(images(cls, 2), patient_name=name, patient_id=f"BROWSER-{index}",
                                 accession_number=f"ACCB{index}", series_description="AX T1")
            files = write_files(datasets, tmp / f"push{index}")
            sent = storescu(dicom_port, files, called_ae="DICOM_TRIAGE")
            assert sent.returncode == 0 and sent.statuses == [0, 0], sent.output[-2000:]
        yield {"url": url, "serve": serve, "settings": settings}
    finally:
        serve.stop(timeout=30)


def shoot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def test_review_in_the_browser(stack: dict[str, object], tmp_path: Path) -> None:
    url = str(stack["url"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            expect(page).to_have_url(f"{url}/login?next=%2F")
            page.fill("input[name=username]", "rad")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.get_by_test_id("who")).to_contain_text("rad (radiologist)")

            # Both pushed studies reach 'done' (the page refreshes itself; reload to be quick about it).
            def classified() -> bool:
                page.reload()
                return page.locator("tr[data-study-id] .status.done").count() == 2

            wait_for(classified, 240, "both studies classified", stack["serve"],  # type: ignore[arg-type]
                     interval=0.25, alive=True)
            rows = page.locator("tr[data-study-id]")
            expect(rows.filter(has_text="BROWSER-0").get_by_test_id("review-state")).to_have_text("pending")
            # The PatientName markup is shown as text, never run: no script element, no alert.
            expect(page.locator("main script")).to_have_count(0)
            expect(rows.filter(has_text="BROWSER-1").locator("a")).to_contain_text("<")
            shoot(page, tmp_path, "1-worklist")

            rows.filter(has_text="BROWSER-0").locator("a").click()
            expect(page.get_by_test_id("result")).to_have_count(1)
            first = page.locator(".slice img").first
            expect(first).to_have_attribute("src", re.compile(r"^/thumbnails/"))
            page.wait_for_function("() => [...document.querySelectorAll('.slice img')].every(i => i.naturalWidth > 0)")
            shoot(page, tmp_path, "2-study")
            page.get_by_test_id("heatmap-toggle").check()
            expect(first).to_have_attribute("src", re.compile(r"^/heatmaps/"))
            page.wait_for_function(
                "() => [...document.querySelectorAll('.slice img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            shoot(page, tmp_path, "3-heatmap")
            page.get_by_test_id("heatmap-toggle").uncheck()
            expect(first).to_have_attribute("src", re.compile(r"^/thumbnails/"))

            label = page.get_by_test_id("result-label").inner_text()
            page.get_by_test_id("confirm").click()
            expect(page.get_by_test_id("result-review")).to_have_text(f"confirmed as {label}")
            expect(page.get_by_test_id("study-review-state")).to_have_text("confirmed")

            page.goto(url + "/")
            page.locator("tr[data-study-id]").filter(has_text="BROWSER-1").locator("a").click()
            expect(page.locator("main script")).to_have_count(0)
            original = page.get_by_test_id("result-label").inner_text()
            choice = page.get_by_test_id("correct-label").locator("option").first.get_attribute("value")
            assert choice and choice != original
            page.get_by_test_id("correct-label").select_option(choice)
            page.get_by_test_id("correct-comment").fill("<b>looks different</b>")
            page.get_by_test_id("correct").click()
            expect(page.get_by_test_id("result-review")).to_have_text(f"corrected as {choice}")
            expect(page.locator(".reviews")).to_contain_text("<b>looks different</b>")
            shoot(page, tmp_path, "4-corrected")

            page.goto(url + "/")
            rows = page.locator("tr[data-study-id]")
            expect(rows.filter(has_text="BROWSER-0").get_by_test_id("review-state")).to_have_text("confirmed")
            expect(rows.filter(has_text="BROWSER-1").get_by_test_id("review-state")).to_have_text("corrected")
            shoot(page, tmp_path, "5-worklist-reviewed")
            assert dialogs == []  # no markup from the DICOM headers ever ran
        finally:
            browser.close()
    settings = stack["settings"]
    heatmaps = list((settings.data_dir / "web-cache" / "heatmaps").rglob("*.png"))  # type: ignore[attr-defined]
    assert len(heatmaps) == 2  # one per slice, rendered once
    # The correction sent a revised SR naming the pipeline's SR as its predecessor, reporting the new class.
    database = Database(settings.effective_database_url)  # type: ignore[attr-defined]
    try:
        with database.session() as session:
            revised = session.scalar(select(SrDocument).where(SrDocument.predecessor_pk.is_not(None)))
            assert revised is not None
            assert read_classification_sr(dcmread(revised.archive_path)).finding == choice
    finally:
        database.dispose()
