"""`uae-fast bench unified` on the demo images (tiny preset) and its HTML report rendered in headless Chromium."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from uae_fast.cli import main
from uae_fast.data.demo import DEMO_IMAGE_NAMES


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny Unified-Bench run over the demo photographs plus a folder with one unreadable file."""
    root = tmp_path_factory.mktemp("unified")
    extra = root / "inputs"
    extra.mkdir()
    (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(extra / "good.png")
    out = root / "out"
    code = main(
        ["bench", "unified", "--demo", "--preset", "tiny", "--backbones", "tiny", "--out", str(out)]
        + ["--max-new-tokens", "8", "--steps", "2"]
    )
    assert code == 0
    args = ["bench", "unified", "--images", str(extra), "--preset", "tiny", "--models", "clip", "--out"]
    strict = main([*args, str(root / "strict")])
    skipping = main([*args, str(root / "b"), "--skip-bad", "--max-new-tokens", "4", "--steps", "1"])
    return out, (strict, skipping), root


class _Table(HTMLParser):
    """Collects the rendered results table: its attributes and each body row's data-v values; and the SVGs."""

    def __init__(self):
        super().__init__()
        self.table_attrs, self.rows, self.svgs, self._in = {}, [], {}, False
        self._svg = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "results":
            self.table_attrs, self._in = a, True
        elif tag == "tr" and self._in:
            self.rows.append([])
        elif tag == "td" and self._in and self.rows:
            self.rows[-1].append(a.get("data-v"))
        elif tag == "svg":
            self._svg = a.get("id")
            self.svgs[self._svg] = []
        elif tag == "rect" and self._svg:
            self.svgs[self._svg].append(int(a["data-count"]))

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif tag == "svg":
            self._svg = None


def _parse(dom: str) -> _Table:
    t = _Table()
    t.feed(dom)
    t.rows = [r for r in t.rows if r]  # the header row has no <td>
    return t


def test_outputs_and_json(run):
    out, _, _ = run
    res = json.loads((out / "unified_bench.json").read_text())
    assert {"model_types", "similarities_by_model", "statistics_by_model", "summary", "unified_bench"} <= set(res)
    assert res["model_types"] == ["clip", "dinov2", "dinov3", "longclip"]
    table = res["unified_bench"]
    assert table["overall"] == pytest.approx(sum(table[m] for m in res["model_types"]) / 4, abs=0.01)
    assert len(res["pairs"]) == 4 and all(p["caption"] is not None for p in res["pairs"])
    for name in DEMO_IMAGE_NAMES:
        assert (out / "recon" / f"{name}.png").is_file() and (out / "sources" / f"{name}.png").is_file()
        assert -1.0 <= res["similarities_by_model"]["clip"][f"{name}.png"] <= 1.0


def test_rescoring_the_written_reconstructions_reproduces_the_scores(run, tmp_path):
    """`bench score` on recon/ vs sources/ gives the unified scores (PNG = the 8-bit values scored in memory)."""
    out, _, _ = run
    target = tmp_path / "rescored.json"
    assert main(["bench", "score", "--image_path", str(out / "recon"), "--ref_image_path", str(out / "sources")]
                + ["--backbones", "tiny", "--output", str(target)]) == 0  # fmt: skip
    first = json.loads((out / "unified_bench.json").read_text())["similarities_by_model"]
    again = json.loads(target.read_text())["similarities_by_model"]
    for name in ("astronaut.png", "chelsea.png"):  # coffee and rocket (> 512 px) were saved as thumbnails
        for m in first:
            assert again[m][name] == pytest.approx(first[m][name], abs=1e-5)


def test_unreadable_input_fails_or_is_listed(run):
    _, (strict, skipping), root = run
    assert strict == 2 and not (root / "strict" / "unified_bench.json").exists()  # without --skip-bad: clear error
    assert skipping == 0
    res = json.loads((root / "b" / "unified_bench.json").read_text())
    assert list(res["similarities_by_model"]["clip"]) == ["good.png"]
    (skip,) = res["skipped"]
    assert skip["file"].endswith("broken.png") and "corrupt or truncated" in skip["reason"]


def test_report_renders_in_chromium(run, tmp_path, browser_dom):
    out, _, _ = run
    res = json.loads((out / "unified_bench.json").read_text())
    t = _parse(browser_dom(out / "unified_bench.html", tmp_path))
    assert len(t.rows) == 4
    # The inline script ran: the table is sorted by mean score, ascending.
    assert t.table_attrs.get("data-sorted-by") == "mean" and t.table_attrs.get("data-sort-dir") == "asc"
    means = [float(r[-1]) for r in t.rows]
    assert means == sorted(means)
    assert sum(t.svgs["hist-caption-length"]) == 4 and sum(t.svgs["hist-scores"]) == 4
    assert len(t.svgs["hist-scores"]) == 10 and {f"hist-{m}" for m in res["model_types"]} <= set(t.svgs)


def test_report_sorts_by_column_from_url(run, tmp_path, browser_dom):
    out, _, _ = run
    t = _parse(browser_dom(out / "unified_bench.html", tmp_path, "#sort=clip:desc"))
    assert t.table_attrs.get("data-sorted-by") == "clip" and t.table_attrs.get("data-sort-dir") == "desc"
    clip = [float(r[5]) for r in t.rows]  # columns: index, source, recon, caption, words, clip, ...
    assert clip == sorted(clip, reverse=True)


def test_report_images_resolve(run):
    out, _, _ = run
    html = (out / "unified_bench.html").read_text()
    for name in DEMO_IMAGE_NAMES:
        assert f"src='recon/{name}.png'" in html and f"src='sources/{name}.png'" in html
