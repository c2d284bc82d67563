"""The HTML report: self-contained, escaped, and rendered without errors by a real headless Chromium."""
import base64
import shutil

import pandas as pd
import pytest

from placement.errors import PlacementError
from placement.report.html import build, record_run, write_report

HOSTILE = '<script>window.injected = 1</script><img src=x onerror="window.injected=2">'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A profile folder and comparison from the tiny model, with a site name and command carrying markup."""
    from click.testing import CliRunner
    from placement.cli import main
    from tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("report")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    out = root / "run"
    result = CliRunner().invoke(main, ["compare", "--model", str(root / "model"), "--data", "builtin:arithmetic",
                                       "--arms", "dominant,all-linear", "--steps", "2", "--batch-size", "4",
                                       "--batches", "2", "--test", "4", "--validation", "4", "--max-new-tokens", "3",
                                       "--out", str(out), "--quiet", "--report"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "profile" / "scores.csv")
    scores.loc[5, "site"] = HOSTILE
    scores.to_csv(out / "profile" / "scores.csv", index=False)
    record_run(out, ["placement", "compare", "--data", HOSTILE])
    write_report(out)
    return out


@pytest.mark.slow
def test_report_is_self_contained_and_escaped(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "Dominant site" in page and "Training the placements" in page and "Top 20 sites" in page
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page
    comparison = page.split("Training the placements", 1)[1]
    assert "100.00%" in comparison and "0.0833" not in comparison  # formatted as the CLI shows it
    assert "the untrained model" in page
    images = page.count('<img src="data:image/png;base64,')
    assert images >= 4 and "http://" not in page and "https://" not in page
    for chunk in page.split('src="data:image/png;base64,')[1:]:
        assert base64.b64decode(chunk.split('"', 1)[0])[:4] == b"\x89PNG"


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(PlacementError, match="no profile, comparison, stability, validation or recommendation"):
        build(tmp_path)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.execute_script("return window.injected === undefined")
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight,"
            " i.getBoundingClientRect().width, i.getBoundingClientRect().height])")
        assert len(sizes) >= 4
        width = driver.execute_script("return document.documentElement.clientWidth")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
        for complete, natural_w, natural_h, shown_w, shown_h in sizes:
            assert complete and natural_w > 0 and natural_h > 0
            assert shown_w <= width and shown_w <= natural_w
            assert shown_h / shown_w == pytest.approx(natural_h / natural_w, rel=0.02)  # scaled, not cut or squeezed
        widest = max(range(len(sizes)), key=lambda i: sizes[i][1])
        assert sizes[widest][1] > width, "the test needs an image wider than the page"
        shown = driver.execute_script("const i = document.images[arguments[0]]; i.click();"
                                      " return i.getBoundingClientRect().width", widest)
        assert round(shown) == sizes[widest][1]  # a click opens it at full size
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_every_arm_of_a_large_comparison_gets_its_own_colour():
    from placement.report.figures import _palette

    for count in (3, 10, 13, 20):
        colours = _palette(count)
        assert len({colours(i) for i in range(count)}) == count
