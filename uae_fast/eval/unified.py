"""``bench unified``: caption every image, regenerate it from the caption, score the pair with the four backbones.

Output folder layout (every file written atomically):

    unified_bench.json   results (authors' schema + unified_bench table, captions, skipped files)
    unified_bench.html   report: source | reconstruction | caption | scores, sortable; histograms
    sources/<name>.png   the source as captioned (downscaled to at most 512 px for the report)
    recon/<name>.png     the reconstruction (score this folder again with ``bench score`` against the sources)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..data.images import LoadedImage
from ..errors import ConfigError
from ..io import ensure_output_dir, save_image_atomic
from .bench import Pair, assign_scores, build_results, score_images, write_results

__all__ = ["run_unified", "REPORT_THUMBNAIL"]

REPORT_THUMBNAIL = 512


def run_unified(
    uae,
    reward,
    batches: Sequence[Sequence[LoadedImage]] | object,
    out: Path,
    *,
    seed: int = 0,
    caption_kwargs: dict | None = None,
    generate_kwargs: dict | None = None,
    skipped: list | None = None,
    extra: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, Path, Path]:
    """Run Protocol 1 over batches of images and write JSON + HTML into ``out``.

    Args:
        uae: A loaded :class:`~uae_fast.api.UAE`.
        reward: A :class:`~uae_fast.rewards.ReconstructionReward` over the backbones to report.
        batches: Iterable of lists of :class:`LoadedImage` (names must be unique: they name the output files).
        out: Output folder (created).
        seed: Caption sampling seed; image i of the run is rendered with noise seed ``seed + i``.
        caption_kwargs: temperature / max_new_tokens for :meth:`UAE.caption` (None values: preset defaults).
        generate_kwargs: steps / guidance / size for :meth:`UAE.generate_tensors`.
        skipped: A list of inputs skipped by the loader (dicts or :class:`~uae_fast.data.images.Skipped`); read
            after the last batch, so the loader may keep appending to it while ``batches`` is consumed.
        extra: More top-level JSON fields (preset, backbones...).
        progress: Optional callable(n) advanced per image.

    Returns:
        (results dict, JSON path, HTML path).
    """
    from ..api import tensors_to_pil

    out = ensure_output_dir(out)
    (out / "sources").mkdir(exist_ok=True)
    (out / "recon").mkdir(exist_ok=True)
    caption_kwargs = {k: v for k, v in (caption_kwargs or {}).items() if v is not None}
    generate_kwargs = {k: v for k, v in (generate_kwargs or {}).items() if v is not None}
    live_skipped = skipped if skipped is not None else []
    skipped = []  # non-finite scores found here
    pairs: list[Pair] = []
    seen: set[str] = set()
    for batch in batches:
        names = [item.name for item in batch]
        dup = seen.intersection(names) or ({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"two inputs are both named {sorted(dup)[0]!r}; rename one (names key the output files)")
        seen.update(names)
        images = [item.image for item in batch]
        captions = uae.caption(images, num_generations=1, seed=seed, **caption_kwargs)
        seeds = [seed + len(pairs) + i for i in range(len(batch))]
        recon = uae.generate_tensors(captions, seed=seeds, allow_empty=True, **generate_kwargs)  # [b, 3, H, W]
        cos, valid = score_images(reward, images, list(recon))
        batch_pairs = []
        for item, caption, picture in zip(batch, captions, tensors_to_pil(recon)):
            thumb = item.image.copy()
            thumb.thumbnail((REPORT_THUMBNAIL, REPORT_THUMBNAIL))
            save_image_atomic(thumb, out / "sources" / f"{item.name}.png")
            save_image_atomic(picture, out / "recon" / f"{item.name}.png")
            batch_pairs.append(
                Pair(
                    name=f"{item.name}.png",
                    reference=item.path or item.name,
                    recon_path=f"recon/{item.name}.png",
                    ref_path=f"sources/{item.name}.png",
                    caption=caption,
                )
            )
        assign_scores(reward.names, batch_pairs, cos, valid, skipped)
        pairs += batch_pairs
        if progress is not None:
            progress(len(batch))
    if not pairs:
        raise ConfigError("no image could be loaded: nothing to evaluate")
    skipped = [_record(s) for s in live_skipped] + skipped
    results = build_results(reward.names, pairs, skipped, {"protocol": "Unified-Bench Protocol 1", **(extra or {})})
    json_path, html_path = write_results(results, out / "unified_bench.json", title="Unified-Bench")
    return results, json_path, html_path


def _record(s) -> dict:
    return s if isinstance(s, dict) else {"file": s.source, "side": "source", "reason": s.reason}
