"""report.html and index.html from a real `pathapp infer` run, opened in a real headless Chromium
(Debian's, driven through Playwright): no console errors, no network, every image present and decoded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, data_file
from vit_factory import tiny_bundle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PATHAPP = Path(sys.executable).with_name("pathapp")
SLIDES = ["wsi/aperio/CMU-1-Small-Region.svs", "wsi/ome-tiff/OS-1-detail.ome.tif"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Chromium with a fresh profile; a skip (a failure in CI) where it or Playwright is missing."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright is not installed (pip install playwright; it drives Debian's chromium)"
    if missing is None and not Path(CHROMIUM).exists():
        missing = "chromium is not installed (apt-get install chromium)"
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(missing)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")),
                                                       executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield context
        context.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    bundle = tiny_bundle(root, 3, mpp=1.0)
    out = root / "out"
    r = subprocess.run([str(PATHAPP), "infer", *(str(data_file(s)) for s in SLIDES), "--model", str(bundle),
                        "--out", str(out), "--workers", "0"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"index: {out / 'index.html'}" in r.stderr
    return out


def _open(browser, page_path: Path) -> tuple[list[str], list[dict], list[str]]:
    """Load a page from disk: (console errors and page errors, every <img>'s state, non-file requests)."""
    page = browser.new_page()
    errors: list[str] = []
    remote: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(page_path.as_uri(), wait_until="load")
    images = page.evaluate("""() => Promise.all([...document.images].map(async img => {
        let decoded = true; try { await img.decode(); } catch (e) { decoded = false; }
        return {src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth,
                height: img.naturalHeight, decoded};
    }))""")
    text = page.inner_text("body")
    page.close()
    return errors, images, remote + [text]


def test_report_renders_in_chromium(browser, run_dir: Path):
    folder = run_dir / "CMU-1-Small-Region"
    errors, images, (*remote, text) = _open(browser, folder / "report.html")
    assert errors == [] and remote == []
    srcs = {i["src"] for i in images}
    assert {"overlay.png", "thumbnail.png", "heatmap-Tumor.png", "heatmap-Stroma.png"} <= srcs
    for img in images:
        assert img["complete"] and img["decoded"] and max(img["width"], img["height"]) >= 1024, img
    run = json.loads((folder / "run.json").read_text())
    for name in ("Tumor", "Stroma", "Immune cells"):  # class areas in mm², as many tiles as run.json counts
        assert name in text
    assert "area (mm²)" in text and str(run["counts"]["tiles"]) in text
    assert "Timings" in text and "batch_size" in text


def test_index_links_every_slide(browser, run_dir: Path):
    errors, images, (*remote, text) = _open(browser, run_dir / "index.html")
    assert errors == [] and remote == []
    assert len(images) == len(SLIDES) and all(i["complete"] and i["decoded"] and i["width"] > 0 for i in images)
    assert "CMU-1-Small-Region" in text and "OS-1-detail" in text
    # a page that does break is caught: a missing picture is reported
    broken = run_dir / "OS-1-detail" / "report.html"
    (run_dir / "OS-1-detail" / "overlay.png").unlink()
    errors, images, _ = _open(browser, broken)
    assert any(not i["decoded"] for i in images) and errors
