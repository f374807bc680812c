"""Unified-Bench (Protocol 1 of the UAE paper): how well does an image survive image → caption → image?

Each reconstruction is compared with its source by the cosine of four backbones' features (CLIP ViT-L/14, DINOv2-L,
DINOv3-L, LongCLIP-L). Per-backbone score = mean cosine × 100; Overall = the unweighted mean of the four. (Paper,
UAE: 90.50 / 94.35 / 81.98 / 77.54 → 86.09.)

The JSON keeps the keys of the authors' scorer (``model_types``, ``similarities_by_model``, ``statistics_by_model``,
``summary`` with ``overall_average``) so existing tooling reads it, and adds ``unified_bench`` (the ×100 table),
``skipped`` (every file not scored, with the reason), ``size_mismatches`` and ``pairs`` (rows of the HTML report).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.images import list_image_files, load_image
from ..errors import ConfigError, ImageLoadError
from ..io import write_text_atomic

__all__ = [
    "MODEL_TYPES",
    "PAPER_UAE",
    "Pair",
    "match_files",
    "score_images",
    "build_results",
    "score_folders",
    "write_results",
]

MODEL_TYPES = ("clip", "dinov2", "dinov3", "longclip")
PAPER_UAE = {"clip": 90.50, "dinov2": 94.35, "dinov3": 81.98, "longclip": 77.54, "overall": 86.09}
# Reconstructions are centre-cropped by CLIP/DINOv2 like their references; a different aspect ratio therefore
# compares different regions. Above this relative difference the pair is reported (and skipped if asked).
ASPECT_TOLERANCE = 0.01


@dataclass
class Pair:
    """One reconstruction and its reference. ``scores`` holds cosines (None when not scored)."""

    name: str  # reconstruction file name: the key in similarities_by_model
    reference: str
    recon_path: str
    ref_path: str
    caption: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)


def match_files(recons: Sequence[Path], refs: Sequence[Path]) -> tuple[list[Pair], list[dict]]:
    """Pair reconstructions with references: exact file name, then stem, then ``recon_<stem>`` (authors' rules).

    Returns:
        The matched pairs (in reconstruction order) and one skip record per unmatched file on either side.
    """
    by_name = {p.name: p for p in refs}
    by_stem: dict[str, Path] = {}
    for p in refs:  # sorted input: the first file of a repeated stem wins, deterministically
        by_stem.setdefault(p.stem, p)
    pairs, skipped, used = [], [], set()
    for rec in recons:
        ref = by_name.get(rec.name) or by_stem.get(rec.stem)
        if ref is None and rec.stem.startswith("recon_"):
            ref = by_stem.get(rec.stem[len("recon_") :])
        if ref is None:
            skipped.append({"file": str(rec), "reason": "no reference image with this name, stem or recon_<stem>"})
            continue
        used.add(ref)
        pairs.append(Pair(rec.name, ref.name, str(rec), str(ref)))
    for ref in refs:
        if ref not in used:
            skipped.append({"file": str(ref), "reason": "reference image has no reconstruction"})
    return pairs, skipped


def _to_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255.0)


def score_images(reward, refs: Sequence, recons: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-backbone cosines of reconstruction i against reference i.

    Args:
        reward: A :class:`~uae_fast.rewards.ReconstructionReward` (its backbones and weights define the columns).
        refs: N references, PIL images or [3, H, W] float tensors in [0, 1] (any sizes).
        recons: N reconstructions, same forms.

    Returns:
        cos [N, K] float32 (column k = ``reward.names[k]``) and valid [N] bool (False: non-finite features).
    """
    src = reward.features([r if isinstance(r, torch.Tensor) else _to_tensor(r) for r in refs])
    rec = reward.features([r if isinstance(r, torch.Tensor) else _to_tensor(r) for r in recons])
    index = torch.arange(len(recons), device=rec.device)
    _, cos, valid = reward.reward_fn(src, rec, index, reward.offsets, reward.weights, None, backend=reward.backend)
    return cos, valid


def _stats(values: list[float]) -> dict:
    return {
        "valid_pairs": len(values),
        "average_similarity": sum(values) / len(values),
        "min_similarity": min(values),
        "max_similarity": max(values),
    }


def build_results(
    model_types: Sequence[str], pairs: Sequence[Pair], skipped: Sequence[dict], extra: Mapping | None = None
) -> dict:
    """The results JSON: the authors' schema plus ``unified_bench``, ``skipped`` and ``pairs``.

    Unscored reconstructions appear with ``None`` in ``similarities_by_model`` as in the authors' scorer, and count
    in ``total_images`` but not in ``valid_pairs``.
    """
    sims = {m: {} for m in model_types}
    for p in pairs:
        for m in model_types:
            sims[m][p.name] = p.scores.get(m)
    for s in skipped:
        if s.get("side") == "reconstruction":
            for m in model_types:
                sims[m].setdefault(Path(s["file"]).name, None)
    stats, averages = {}, {}
    for m in model_types:
        values = [v for v in sims[m].values() if v is not None]
        if values:
            stats[m] = {"total_images": len(sims[m]), **_stats(values)}
            averages[m] = stats[m]["average_similarity"]
    summary = {}
    if averages:
        summary = {
            "models_used": list(averages),
            "average_scores_by_model": averages,
            "overall_average": sum(averages.values()) / len(averages),
            "best_model": list(max(averages.items(), key=lambda kv: kv[1])),
            "worst_model": list(min(averages.items(), key=lambda kv: kv[1])),
        }
    table = {m: round(100.0 * v, 2) for m, v in averages.items()}
    if averages:
        table["overall"] = round(100.0 * summary["overall_average"], 2)
    return {
        "model_types": list(model_types),
        "similarities_by_model": sims,
        "statistics_by_model": stats,
        "summary": summary,
        "unified_bench": table,
        "paper_uae": PAPER_UAE,
        "num_pairs": len(pairs),
        "skipped": list(skipped),
        **(dict(extra) if extra else {}),
        "pairs": [vars(p) for p in pairs],
    }


def write_results(results: dict, json_path: Path, title: str) -> tuple[Path, Path]:
    """Write the JSON and the HTML report beside it (``X.json`` → ``X.html``), both atomically."""
    from .report import render_report

    json_path = Path(json_path)
    html_path = json_path.with_suffix(".html")
    write_text_atomic(json_path, json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(html_path, render_report(results, title=title, base=html_path.parent))
    return json_path, html_path


def _load_pair(pair: Pair, skipped: list) -> tuple | None:
    images = []
    for path, side in ((pair.ref_path, "reference"), (pair.recon_path, "reconstruction")):
        try:
            images.append(load_image(path))
        except ImageLoadError as exc:
            skipped.append({"file": path, "side": side, "reason": str(exc)})
            if side == "reference":  # the reconstruction is then unscored too
                skipped.append(
                    {"file": pair.recon_path, "side": "reconstruction", "reason": "its reference is unreadable"}
                )
            return None
    return tuple(images)


def _aspect_mismatch(ref, rec) -> bool:
    return abs((rec.width / rec.height) / (ref.width / ref.height) - 1.0) > ASPECT_TOLERANCE


def score_folders(
    image_path: Path,
    ref_image_path: Path,
    reward,
    *,
    batch_size: int = 16,
    on_size_mismatch: str = "score",
    progress=None,
) -> dict:
    """Score a folder of reconstructions against a folder of references (``bench score``).

    Args:
        image_path: Folder of reconstructions.
        ref_image_path: Folder of references.
        reward: A :class:`~uae_fast.rewards.ReconstructionReward` whose backbones are the models to report.
        batch_size: Pairs per feature batch.
        on_size_mismatch: For pairs whose aspect ratios differ: "score" (report only), "skip" or "error".
        progress: Optional callable(n) advanced per scored pair.

    Returns:
        The results dict of :func:`build_results` (plus the reconstructions' and references' folders).

    Raises:
        ImageLoadError: A folder is missing or holds no images. ConfigError: nothing matched, or a size
        mismatch with ``on_size_mismatch="error"``.
    """
    if on_size_mismatch not in ("score", "skip", "error"):
        raise ConfigError(f"on_size_mismatch must be score, skip or error, got {on_size_mismatch!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    recons, refs = list_image_files(image_path), list_image_files(ref_image_path)
    pairs, skipped = match_files(recons, refs)
    for s in skipped:
        s["side"] = "reconstruction" if s["reason"].startswith("no reference") else "reference"
    if not pairs:
        raise ConfigError(
            f"no reconstruction in {image_path} matches a reference in {ref_image_path} "
            "(matched by file name, then stem, then recon_<stem>)"
        )
    mismatches, scored = [], []
    for start in range(0, len(pairs), batch_size):
        batch, loaded = [], []
        for pair in pairs[start : start + batch_size]:
            images = _load_pair(pair, skipped)
            if images is None:
                continue
            ref, rec = images
            if _aspect_mismatch(ref, rec):
                mismatches.append({"file": pair.name, "reconstruction_size": rec.size, "reference_size": ref.size})
                if on_size_mismatch == "error":
                    raise ConfigError(
                        f"{pair.recon_path} is {rec.width}x{rec.height} but its reference {pair.ref_path} is "
                        f"{ref.width}x{ref.height} (different aspect ratio); use --on-size-mismatch score or skip"
                    )
                if on_size_mismatch == "skip":
                    skipped.append(
                        {"file": pair.recon_path, "side": "reconstruction", "reason": "aspect ratio differs"}
                    )
                    continue
            batch.append(pair)
            loaded.append(images)
        if batch:
            cos, valid = score_images(reward, [a for a, _ in loaded], [b for _, b in loaded])
            assign_scores(reward.names, batch, cos, valid, skipped)
            scored += batch
        if progress is not None:
            progress(len(pairs[start : start + batch_size]))
    extra = {"image_path": str(image_path), "ref_image_path": str(ref_image_path), "size_mismatches": mismatches}
    return build_results(reward.names, scored, skipped, extra)


def assign_scores(names: Sequence[str], pairs: Sequence[Pair], cos: torch.Tensor, valid: torch.Tensor, skipped: list):
    """Store each pair's per-backbone cosines [P, K] in `pair.scores` (None and a `skipped` entry when invalid)."""
    cos, valid = cos.cpu().tolist(), valid.cpu().tolist()
    for pair, row, ok in zip(pairs, cos, valid):
        if ok and all(math.isfinite(v) for v in row):
            pair.scores = dict(zip(names, row))
        else:
            pair.scores = {n: None for n in names}
            skipped.append(
                {"file": pair.recon_path, "side": "reconstruction", "reason": "non-finite features (NaN/inf)"}
            )
