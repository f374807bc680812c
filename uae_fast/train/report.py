"""The run's reconstruction report: a few training images captioned by the base and the trained encoder, each
caption rendered by the decoder and scored — a picture of what the run changed, in `report/index.html`."""

from __future__ import annotations

import contextlib
import html
import json
from pathlib import Path

import torch

from ..api import tensors_to_pil
from ..io import atomic_dir

__all__ = ["write_report"]


@torch.no_grad()
def _greedy_reconstructions(trainer, images) -> tuple[list[str], torch.Tensor, list[float]]:
    from .g4u import RolloutBatch

    cfg = trainer.config
    encoded = trainer.policy.encode_images([im.image for im in images])
    completions = trainer.policy.sample(encoded, 1, max_new_tokens=cfg.max_completion_length, temperature=0.0)
    seeds = [cfg.seed + i for i in range(len(images))]
    batch = RolloutBatch(images, encoded, completions, trainer.policy.decode(completions), seeds)
    trainer.reconstruct(batch)
    out = trainer.reward([im.image for im in images], batch.reconstructions, num_generations=1)
    scores = torch.where(out.valid, out.rewards, float("nan")).tolist()
    return batch.captions, batch.reconstructions, scores


def write_report(trainer, folder: Path, count: int) -> Path:
    """Write `folder/index.html` (+ PNGs, report.json) for the first `count` training images (greedy captions)."""
    images = trainer.dataset.preview(count)
    results = {}
    for label, context in (("base", trainer.policy.adapters_disabled()), ("trained", contextlib.nullcontext())):
        with context:
            results[label] = _greedy_reconstructions(trainer, images)
    rows = []
    with atomic_dir(folder) as tmp:
        for i, im in enumerate(images):
            row = {"image": im.key, "source": f"{i:03d}_source.png"}
            im.image.save(tmp / row["source"])
            for label, (captions, recon, scores) in results.items():
                name = f"{i:03d}_{label}.png"
                tensors_to_pil(recon[i : i + 1])[0].save(tmp / name)
                row[label] = {"caption": captions[i], "reward": scores[i], "reconstruction": name}
            rows.append(row)
        (tmp / "report.json").write_text(json.dumps({"step": trainer.step, "rows": rows}, indent=2))
        (tmp / "index.html").write_text(_html(rows, trainer.step))
    return folder


def _html(rows: list[dict], step: int) -> str:
    def cell(entry: dict) -> str:
        return (
            f'<td><img src="{entry["reconstruction"]}" width="192"><div>reward {entry["reward"]:.4f}</div>'
            f'<div class="cap">{html.escape(entry["caption"])}</div></td>'
        )

    body = "".join(
        f'<tr><td><img src="{r["source"]}" width="192"><div>{html.escape(r["image"])}</div></td>'
        f"{cell(r['base'])}{cell(r['trained'])}</tr>"
        for r in rows
    )
    return (
        "<!doctype html><meta charset=utf-8><title>uae-fast reconstruction report</title>"
        "<style>body{font:14px system-ui;margin:24px}td{vertical-align:top;padding:6px}"
        ".cap{max-width:320px;font-size:12px;color:#444}</style>"
        f"<h1>Reconstructions after step {step}</h1><p>Greedy captions of the base encoder (adapters off) and the "
        "trained one, each rendered by the frozen decoder from the same noise.</p>"
        f"<table><tr><th>source</th><th>base</th><th>trained</th></tr>{body}</table>"
    )
