"""`uae-fast train`: a whole run through the CLI, its run folder, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import uae_fast
from uae_fast.cli import main
from uae_fast.train.report import line_chart_svg

SMALL = ["max_steps=2", "batch_size=8", "num_generations=4", "decoder.steps=2", "report_images=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), *SMALL]) == 0
    return run


def test_run_folder_has_everything(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward" in r and "kl" not in r for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoint-2" / "llm_lora" / "adapter_model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    for sub in ("llm", "llm_lora", "SD3", "dit"):
        assert (run_dir / "final" / sub).is_dir()
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [r["image"] for r in report["rows"]] == ["astronaut", "chelsea"]
    html = (run_dir / "report" / "index.html").read_text()
    assert html.count("<img") == 6 and "000_trained.png" in html


def test_the_closing_line_names_only_what_the_run_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["max_steps=1", "batch_size=8", "num_generations=4", "decoder.steps=2", "report_images=0"]
    assert main(["train", "--preset", "tiny", "--out", str(run), *args, "save_final_model=false"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"uae-fast: run folder {run} (metrics.jsonl, checkpoints)"
    assert not (run / "final").exists() and not (run / "report").exists()


def test_final_model_reproduces_the_trained_policy(run_dir, demo):
    """final/ (llm/ + the trained llm_lora/ incl. embeddings) loads through uae_fast.load and captions like the
    trained policy did in the report (greedy, transformers' generate on the loaded model vs our sampler)."""
    report = json.loads((run_dir / "report" / "report.json").read_text())
    loaded = uae_fast.load(run_dir / "final", device="cpu")
    captions = loaded.caption(demo[:2], temperature=0, max_new_tokens=8)
    assert captions == [r["trained"]["caption"] for r in report["rows"]]
    base = uae_fast.load("tiny", device="cpu").caption(demo[:2], temperature=0, max_new_tokens=8)
    assert base == [r["base"]["caption"] for r in report["rows"]]


def test_list_configs(capsys):
    assert main(["train", "--list-configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("g4u_tiny", "u4g_tiny", "unified_tiny", "u4g_uae3b", "unified_uae3b"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "tiny"], "pass --out RUN_DIR"),
        (["--preset", "tiny", "--out", "X", "max_steps=abc"], "max_steps must be int"),
        (["--preset", "tiny", "--out", "X", "oops"], "overrides look like key=value"),
        (["--config", "nope.yaml", "--out", "X"], "config file not found: nope.yaml"),
        (["--config", "g4u_tiny", "--stage", "u4g", "--out", "X"], "with --config, set stage=... as an override"),
        (["--preset", "tiny", "--stage", "u4g", "--out", "X", "u4g.noise_level=0"], "u4g.noise_level must be > 0"),
    ],
)
def test_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("uae-fast: error:")


@pytest.mark.parametrize(
    "args",
    [
        ["max_steps=abc"],  # a wrong value
        ["bogus=1"],  # an unknown key
        ["--out", "{held}"],  # a folder that holds a run, without --resume/--overwrite
    ],
)
def test_bad_config_is_refused_before_the_heavy_imports(args, tmp_path):
    """The refusal comes before torch/transformers load (seconds): the config and the run folder are checked with
    light modules only."""
    held = tmp_path / "held"
    (held / "checkpoint-3").mkdir(parents=True)
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "new")] + [a.format(held=held) for a in args]
    code = (
        "import sys; from uae_fast.cli import main; "
        f"status = main({argv!r}); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules); "
        "print(status, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert out.stderr.strip().startswith("uae-fast: error:") and len(out.stderr.strip().splitlines()) == 1


def test_report_has_curves_settings_and_the_tiny_note(run_dir, tmp_path, browser_dom):
    """The run report, rendered in headless Chromium: one curve per logged step in each chart (reward with its
    ± std band, caption length vs the reference, KL, entropy), the key settings, the random-tiny-preset note."""
    dom = browser_dom(run_dir / "report" / "index.html", tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 'id="tiny-note"' in dom and "random-weight tiny preset" in dom
    settings = dom[dom.index('id="settings"') : dom.index("</table>", dom.index('id="settings"'))]
    assert "<th>learning_rate</th><td>0.002</td>" in settings and "<th>num_generations</th><td>4</td>" in settings
    for chart in ("curve-0", "curve-1", "curve-2", "curve-3"):
        assert f'id="{chart}"' in dom
    reward = dom[dom.index('id="curve-0"') : dom.index("</svg>", dom.index('id="curve-0"'))]
    line = reward[reward.index('class="line"') :]
    path = line[line.index(' d="M') + 4 : line.index('"', line.index(' d="M') + 4)]
    assert path.count("L") == len(rows) - 1  # one vertex per logged step
    assert 'class="band"' in reward  # reward ± within-group std
    assert "not logged" in dom[dom.index('id="curve-2"') :]  # beta = 0: no KL in this run


def test_line_chart_scales_points_into_the_frame():
    svg = line_chart_svg([("a", [(1, 0.0), (2, 1.0), (3, float("nan")), (4, 0.5)])], title="t", element_id="c")
    path = svg[svg.index(' d="M', svg.index('class="line"')) + 4 :].split('"')[0]
    points = [tuple(map(float, p.split(","))) for p in path[1:].split("L")]
    assert len(points) == 3  # the NaN point is left out
    (x0, y0), (x1, y1), (x3, y3) = points
    assert x0 < x1 < x3 and y0 > y3 > y1  # larger values higher up (SVG y grows downwards)
    assert y0 - y3 == pytest.approx(y3 - y1)  # 0.5 sits halfway between 0 and 1
