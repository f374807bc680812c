"""The run report, `report/index.html`: what the run was (key settings, and whether the model is the random tiny
preset), how it went (training curves as inline SVG, from `metrics.jsonl`) and what it changed (a few training
images captioned by the base and the trained encoder, each caption rendered by the decoder and scored).
Self-contained: one HTML file, the images beside it, no scripts."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..api import tensors_to_pil
from ..io import atomic_dir
from .metrics import read_metrics

__all__ = ["write_report", "line_chart_svg"]

# Per stage: (title, [(metric, label)], band metric giving ± around the first series or None)
_G4U_CURVES = (
    ("reward (mean ± within-group std)", [("reward", "reward")], "reward_std"),
    (
        "caption length (tokens) vs the reference captions",
        [("completions/mean_length", "sampled"), ("completions/reference_mean_length", "reference")],
        None,
    ),
    ("KL to the reference policy", [("kl", "kl")], None),
    ("entropy (nats per token)", [("entropy", "entropy")], None),
)
_U4G_CURVES = (
    ("reward (mean ± within-group std)", [("reward", "reward")], "reward_std"),
    ("KL to the reference DiT", [("kl", "kl")], None),
    ("clipped fraction of the per-step ratios", [("clip_ratio", "clip ratio")], None),
    ("log-prob of the sampled steps (mean per element)", [("rollout/logprob_mean", "log-prob")], None),
)
CURVES = {
    "g4u": _G4U_CURVES,
    "u4g": _U4G_CURVES,
    "cold_start": (
        ("reconstruction similarity cos(f(x̃), f(x)) (mean ± std over the batch)", [("reward", "train")], "reward_std"),
        ("loss", [("loss", "loss")], None),
        ("gradient norm", [("grad_norm", "grad_norm")], None),
    ),
    "unified": (
        ("reward of each stage's steps", [("g4u/reward", "stage 2a"), ("u4g/reward", "stage 2b")], None),
        ("KL to the reference", [("g4u/kl", "stage 2a"), ("u4g/kl", "stage 2b")], None),
        ("caption length (tokens)", [("completions/mean_length", "sampled")], None),
        ("entropy (nats per token)", [("entropy", "entropy")], None),
    ),
}
_PRETRAIN_CURVES = (
    ("rectified-flow loss", [("loss", "loss")], None),
    (
        "evaluation loss: own captions vs shuffled",
        [("eval/loss_own", "own captions"), ("eval/loss_shuffled", "shuffled captions")],
        None,
    ),
    ("z of the own-caption gain (0: captions ignored)", [("eval/caption_gain_z", "z")], None),
    ("gradient norm", [("grad_norm", "grad norm")], None),
)
CURVES["pretrain"] = _PRETRAIN_CURVES
COLUMNS = {  # what the report's columns show
    "g4u": "Greedy captions of the base encoder (adapters off) and the trained one, each rendered by the frozen "
    "decoder from the same noise.",
    "u4g": "Each image's caption (by the frozen captioner) rendered by the base DiT (adapters off) and the trained "
    "one, from the same noise.",
    "unified": "Greedy captions and renders of the base UAE (both adapters off) and the trained one (both on), from "
    "the same noise.",
    "cold_start": "Greedy captions reconstructed by the cold start's sampler with both adapters off (the base UAE) "
    "and on, from the same noise.",
    "pretrain": "Each image's own long caption rendered by the trained decoder (the EMA weights when kept).",
}
_COMMON = ("stage", "model", "seed", "max_steps", "decoder.size", "decoder.guidance", "decoder.conditioning",
           "data.images")  # fmt: skip
_G4U = ("batch_size", "num_generations", "temperature", "max_completion_length", "learning_rate", "loss.loss_type",
        "loss.beta", "lora.r", "lora.alpha", "decoder.steps")  # fmt: skip
_U4G = ("u4g.batch_size", "u4g.num_generations", "u4g.captions", "u4g.num_steps", "u4g.noise_level", "u4g.sde_type",
        "u4g.sde_window_size", "u4g.clip_range", "u4g.beta", "u4g.learning_rate", "u4g.lora.r")  # fmt: skip
_COLD_START = ("cold_start.batch_size", "cold_start.num_steps", "cold_start.size", "cold_start.learning_rate",
               "cold_start.backbone", "cold_start.captions", "lora.r", "cold_start.dit_lora.r")  # fmt: skip
_PRETRAIN = ("data.shards", "pretrain.batch_size", "pretrain.learning_rate", "pretrain.finetune",
             "pretrain.train_projector", "pretrain.resolutions", "pretrain.weighting_scheme",
             "pretrain.ema_decay")  # fmt: skip
SETTINGS = {"g4u": _COMMON + _G4U, "u4g": _COMMON + _U4G, "unified": _COMMON + ("unified.schedule",) + _G4U + _U4G,
            "cold_start": _COMMON + _COLD_START, "pretrain": _COMMON + _PRETRAIN}  # fmt: skip
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def write_report(trainer, run_dir: Path) -> Path:
    """Write `run_dir/report/` (index.html, PNGs, report.json) for the first `report_images` training images.

    The trainer's `report_columns(images)` gives, for "base" and "trained", each image's caption, render and reward.
    """
    from PIL import Image

    images = trainer.dataset.preview(trainer.config.report_images)
    results = trainer.report_columns(images)
    rows = []
    with atomic_dir(Path(run_dir) / "report") as tmp:
        for i, im in enumerate(images):
            row = {"image": im.key, "source": f"{i:03d}_source.png"}
            Image.fromarray(im.pixels).save(tmp / row["source"])
            for label, (captions, recon, scores) in results.items():
                name = f"{i:03d}_{label}.png"
                tensors_to_pil(recon[i : i + 1])[0].save(tmp / name)
                row[label] = {"caption": captions[i], "reward": scores[i], "reconstruction": name}
            rows.append(row)
        config = trainer.config.to_dict()
        metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
        (tmp / "report.json").write_text(json.dumps({"step": trainer.step, "rows": rows}, indent=2))
        (tmp / "index.html").write_text(_html(rows, trainer.step, config, metrics))
    return Path(run_dir) / "report"


def line_chart_svg(series: list[tuple[str, list[tuple[float, float]]]], *, title: str, element_id: str,
                   band: list[tuple[float, float, float]] | None = None) -> str:  # fmt: skip
    """An inline SVG line chart: `series` = [(label, [(x, y), ...])], optional `band` = [(x, low, high)] shaded
    behind the first series. Non-finite points are left out."""
    width, height, left, right, top, bottom = 420, 200, 52, 10, 24, 28
    points = [(x, y) for _, pts in series for x, y in pts if math.isfinite(y)]
    points += [(x, v) for x, lo, hi in band or [] for v in (lo, hi) if math.isfinite(v)]
    parts = [
        f'<svg id="{element_id}" class="chart" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="15" font-size="12">{html.escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{left}" y="{height // 2}" font-size="12" fill="#888">not logged</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    frame = f"M{left},{top}V{height - bottom}H{width - right}"
    parts.append(f'<path d="{frame}" fill="none" stroke="#999"/>')
    for y in (y0, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{y:.4g}</text>')
    for x in (x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - 10}" font-size="10" text-anchor="middle">{x:g}</text>')
    band = [(x, lo, hi) for x, lo, hi in band or [] if math.isfinite(lo) and math.isfinite(hi)]
    if band:
        outline = [(sx(x), sy(hi)) for x, _, hi in band] + [(sx(x), sy(lo)) for x, lo, _ in reversed(band)]
        d = "M" + "L".join(f"{a:.1f},{b:.1f}" for a, b in outline) + "Z"
        parts.append(f'<path class="band" d="{d}" fill="{_COLOURS[0]}" fill-opacity="0.18" stroke="none"/>')
    for k, (label, pts) in enumerate(series):
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts:
            continue
        colour = _COLOURS[k % len(_COLOURS)]
        d = "M" + "L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<path class="line" data-label="{html.escape(label)}" d="{d}" fill="none" stroke="{colour}"/>')
        parts.append(
            f'<text x="{width - right - 4}" y="{top + 12 * (k + 1)}" font-size="10" text-anchor="end" '
            f'fill="{colour}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _curves(metrics: list[dict], stage: str) -> str:
    charts = []
    for i, (title, keys, band_key) in enumerate(CURVES[stage]):
        series = [(label, [(r["step"], float(r[k])) for r in metrics if _number(r.get(k))]) for k, label in keys]
        band = None
        if band_key is not None:
            first = keys[0][0]
            band = [
                (r["step"], r[first] - r[band_key], r[first] + r[band_key])
                for r in metrics
                if _number(r.get(first)) and _number(r.get(band_key))
            ]
        charts.append(line_chart_svg(series, title=title, element_id=f"curve-{i}", band=band))
    return "".join(charts)


def _setting(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _html(rows: list[dict], step: int, config: dict, metrics: list[dict]) -> str:
    stage = config["stage"]

    def cell(entry: dict) -> str:
        return (
            f'<td><img src="{entry["reconstruction"]}" width="192"><div>reward {entry["reward"]:.4f}</div>'
            f'<div class="cap">{html.escape(entry["caption"])}</div></td>'
        )

    labels = [k for k in (rows[0] if rows else {"base": 0, "trained": 0}) if k not in ("image", "source")]
    body = "".join(
        f'<tr><td><img src="{r["source"]}" width="192"><div>{html.escape(r["image"])}</div></td>'
        + "".join(cell(r[label]) for label in labels)
        + "</tr>"
        for r in rows
    )
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    settings = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(_setting(config, k)))}</td></tr>" for k in SETTINGS[stage]
    )
    tiny = ""
    if config.get("model") == "tiny":
        tiny = (
            '<p class="warn" id="tiny-note">This run trained the <b>random-weight tiny preset</b>: its captions are '
            "gibberish by design; only the curves' direction (against the negated-advantage control) means anything."
            "</p>"
        )
    return (
        "<!doctype html><meta charset=utf-8><title>uae-fast training report</title>"
        "<style>body{font:14px system-ui;margin:24px}td,th{vertical-align:top;padding:4px 6px;text-align:left}"
        ".cap{max-width:320px;font-size:12px;color:#444}.warn{background:#fff3cd;padding:8px}"
        ".chart{margin:4px 12px 4px 0}</style>"
        f"<h1>Training report: step {step}</h1>{tiny}"
        f'<h2>Settings</h2><table id="settings">{settings}</table>'
        f'<h2>Curves</h2><div id="curves">{_curves(metrics, stage)}</div>'
        f"<h2>Reconstructions after step {step}</h2><p>{COLUMNS[stage]}</p>"
        f'<table id="reconstructions"><tr><th>source</th>{header}</tr>{body}</table>'
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
