"""The report as a reader meets it: opened in headless Chromium, for a small simulated study
and for the authors' published results.

Each report's folder is copied elsewhere first (the page must not depend on where it was
written) and loaded through the DevTools protocol (:mod:`browser`). Asserted: no console
error, exception or failed load; every image decodes; every local link resolves to a
non-empty file inside the copied folder, and every in-page link to an element that exists;
the table of contents lists every section and resolves; each figure section expected of the
study is there, with its figures and their PNG (and SVG where written) linked; every linked
HTML view loads without errors too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from analysis_fixtures import ROOT, analysis_study, reference_path  # noqa: F401
from browser import Browser, Loaded, ensure_chromium
from neurotask.pipeline import cli

# Sections every report has, and the figure sections of a study with ROI labels and voxel positions.
BASE_SECTIONS = ["summary", "comparison", "significant", "provenance"]
FIGURE_SECTIONS = ["fig1", "fig2", "fig3", "fig5", "fig6", "fig7"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium(ROOT)
    with Browser(tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


@pytest.fixture(scope="module")
def published_report(tmp_path_factory) -> Path:
    """The published study imported, analysed and reported through the CLI. -> report folder."""
    d = tmp_path_factory.mktemp("published")
    cfg = yaml.safe_load((ROOT / "configs" / "published.yaml").read_text())
    cfg["study"]["workdir"] = str(d / "work")
    config = d / "published.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert cli.main(["import-published", str(reference_path() / "published"), "--config", str(config),
                     "--upstream", "github.com/ariaaay/NeuralTaskonomy@5400d0e8d671e3078918f846f18508b012299795"]) == 0
    assert cli.main(["analyse", "--config", str(config)]) == 0
    assert cli.main(["report", "--config", str(config)]) == 0
    return d / "work" / "report"


def local_target(href: str, page: Path) -> Path | None:
    """The file a link points to, or None for in-page anchors and non-file URLs."""
    url = urlparse(href)
    if url.scheme in ("http", "https", "mailto", "data") or href.startswith("#"):
        return None
    return (page.parent / unquote(url.path)).resolve()


def check_report(browser: Browser, report: Path, copy: Path, expected: list[str]) -> Loaded:
    """Open a copy of ``report`` and assert everything of the module docstring. -> what loaded."""
    shutil.copytree(report, copy)
    page = copy / "index.html"
    found = browser.load(page.as_uri())
    assert found.errors == [], found.errors
    assert "neurotask report" in found.title

    # images: all decode, one per figure, none tiny
    assert found.images and all(i["ok"] for i in found.images), [i for i in found.images if not i["ok"]]
    assert all(i["w"] >= 300 and i["h"] >= 150 for i in found.images), found.images

    # links: files beside the page, non-empty; anchors to existing ids; nothing absolute
    ids = set(found.ids)
    assert len(ids) == len(found.ids), "duplicate element ids"
    files = []
    for link in found.links:
        href = link["href"]
        if href.startswith("#"):
            assert href[1:] in ids, f"in-page link {href} has no target"
            continue
        target = local_target(href, page)
        if target is None:
            continue
        assert not Path(href).is_absolute() and not urlparse(href).scheme, f"absolute link {href}"
        assert target.is_relative_to(copy.resolve()), f"{href} points outside the report's folder"
        assert target.is_file() and target.stat().st_size > 0, f"{href}: missing or empty"
        files.append(target)

    # the table of contents: every section listed, every entry resolving
    assert found.toc == [f"#{s}" for s in found.sections], (found.toc, found.sections)
    for section in expected:
        assert section in found.sections, f"section {section} missing: {found.sections}"

    # each figure's files are linked: its PNG, and its SVG when one was written
    hrefs = {link["href"] for link in found.links}
    figures = [i for i in found.ids if (copy / "figures" / f"{i}.png").is_file()]
    assert len(figures) == len(found.images), (figures, len(found.images))
    for key in figures:
        assert f"figures/{key}.png" in hrefs, key
        if (copy / "figures" / f"{key}.svg").is_file():
            assert f"figures/{key}.svg" in hrefs, key

    # every NIfTI file written is linked
    written = {p.resolve() for p in (copy / "nifti").rglob("*") if p.is_file()}
    assert written and written <= set(files), sorted(str(p) for p in written - set(files))[:5]

    # linked HTML views (interactive maps) load without errors too
    for view in sorted({f for f in files if f.suffix == ".html"}):
        loaded = browser.load(view.as_uri(), settle=1.0)
        assert loaded.errors == [], (view.name, loaded.errors)
    return found


@pytest.mark.slow
def test_simulated_study_report_in_chromium(analysis_study, browser, tmp_path):
    found = check_report(browser, analysis_study.workdir / "report", tmp_path / "copied",
                         BASE_SECTIONS + FIGURE_SECTIONS + ["nifti"])
    assert "claims" not in found.sections  # fitted here, not the published results


@pytest.mark.slow
def test_published_report_in_chromium(published_report, browser, tmp_path):
    found = check_report(browser, published_report, tmp_path / "copied",
                         BASE_SECTIONS + FIGURE_SECTIONS + ["claims", "nifti"])
    # the page stays light enough to open: 20 figures at 200 dpi, embedded as lossless WebP (1.7 MB)
    assert (published_report / "index.html").stat().st_size < 2_500_000
    assert found.height > 2000
    # the provenance names where the imported results were released (import-published --upstream)
    page = (published_report / "index.html").read_text()
    assert "github.com/ariaaay/NeuralTaskonomy" in page and "5400d0e8d671e3078918f846f18508b012299795" in page
