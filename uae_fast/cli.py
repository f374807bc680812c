"""`uae-fast` command line: caption, generate and reconstruct with a preset or a checkpoint folder.

Errors caused by input (bad images, missing checkpoints, wrong values) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import CheckpointError, ConfigError, ImageLoadError, UAEError

__all__ = ["main", "build_parser", "quiet_libraries"]

EXIT_USER_ERROR = 2
_VAE_FACTOR = 8  # SD3's VAE downsamples by 8; every SD3/SD3.5 checkpoint shares it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uae-fast",
        description="Unified Auto-Encoder tools: image → caption (Qwen2.5-VL) → image (SD3.5).",
        epilog="Example: uae-fast reconstruct --demo --preset tiny --out out/",
    )
    # The deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cap = sub.add_parser("caption", help="caption images", description="Caption images with the encoder.")
    _add_images(cap)
    _add_model(cap)
    _add_caption_opts(cap)
    cap.add_argument("--out", type=Path, help="also write captions.jsonl into this folder")

    gen = sub.add_parser("generate", help="render captions to images", description="Render captions with the decoder.")
    gen.add_argument("captions", nargs="*", metavar="CAPTION", help="caption texts")
    gen.add_argument("--captions-file", type=Path, help="a .txt file (one caption per line) or .jsonl with 'caption'")
    gen.add_argument("--out", type=Path, required=True, help="output folder (created; PNGs + captions.jsonl)")
    _add_model(gen)
    _add_generate_opts(gen)

    rec = sub.add_parser(
        "reconstruct",
        help="image → caption → image",
        description="Caption each image, render the caption, and write one PNG per input plus captions.jsonl.",
    )
    _add_images(rec)
    rec.add_argument("--out", type=Path, required=True, help="output folder (created)")
    _add_model(rec)
    _add_caption_opts(rec)
    _add_generate_opts(rec)

    from .data.cli import add_data_parser  # stage 1's shards: `data build`, `data check`
    from .eval.cli import add_bench_parser  # Unified-Bench: `bench unified`, `bench score`
    from .train.cli import add_train_parser

    add_bench_parser(sub)
    add_train_parser(sub)
    add_data_parser(sub)
    return parser


def _add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--demo", action="store_true", help="use the bundled demo photographs (scikit-image)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in skipped.json)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="'tiny', 'uae-3b', or a checkpoint folder (default: tiny)")
    g.add_argument("--conditioning", choices=("llm", "text"), default="llm", help="decoder conditioning (llm = UAE)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling and noise (default: 0)")


def _add_caption_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("captioning")
    g.add_argument("--num-generations", type=int, default=1, help="captions per image (default: 1)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: preset's)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit (default: preset's)")


def _add_generate_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: preset's)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale, <= 1 disables (default: preset's)")
    g.add_argument("--size", type=int, default=None, help="output side in pixels (default: preset's)")


def _caption_kwargs(args) -> dict:
    return {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}


def _generate_kwargs(args) -> dict:
    return {"steps": args.steps, "guidance": args.guidance, "size": args.size}


def _check_common(args) -> None:
    """Validate numeric options and the preset before any output folder is made or model loaded."""
    for option in ("batch_size", "num_generations", "steps"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    size = getattr(args, "size", None)
    if size is not None and (size <= 0 or size % _VAE_FACTOR):
        raise ConfigError(f"--size must be a positive multiple of {_VAE_FACTOR} (the VAE factor), got {size}")
    preset = getattr(args, "preset", None)  # `bench score` loads no UAE
    if args.command == "train" or preset is None:  # train: its config is validated without the heavy imports
        return
    from .api import PRESETS

    if preset not in PRESETS and not Path(preset).is_dir():
        raise CheckpointError(f"--preset {preset}: not a preset ({', '.join(PRESETS)}) or a checkpoint folder")


def _image_paths(args) -> list[Path]:
    """Expand folders and, unless --skip-bad, decode every image once up front: a bad file then fails the run
    before anything is written, instead of leaving half of the outputs behind."""
    from .data.images import list_image_files, load_image

    if not args.images and not args.demo:
        raise ConfigError("give IMAGE paths or --demo")
    paths: list[Path] = []
    for p in args.images:
        if p.is_dir():
            paths += list_image_files(p)
        elif p.exists() or args.skip_bad:
            paths.append(p)
        else:
            raise ImageLoadError(f"{p}: no such file")
    if not args.skip_bad:
        for p in paths:
            load_image(p)
    return paths


def _image_batches(args, paths: list[Path], skipped: list) -> Iterator[list]:
    """Yield batches of LoadedImage (demo images first) with names unique across the whole run."""
    from .data.demo import demo_images
    from .data.images import load_images

    used: set[str] = set()
    batch = [_unique(item, used) for item in demo_images()] if args.demo else []
    for start in range(0, len(paths), args.batch_size):
        loaded, bad = load_images(paths[start : start + args.batch_size], skip_bad=args.skip_bad)
        skipped += bad
        batch += [_unique(item, used) for item in loaded]
        while len(batch) >= args.batch_size:
            yield batch[: args.batch_size]
            batch = batch[args.batch_size :]
    if batch:
        yield batch


def _unique(item, used: set[str]):
    """Rename `item` to `name-2`, `name-3`, ... if an earlier image of this run already took its name."""
    name, k = item.name, 2
    while name in used:
        name, k = f"{item.name}-{k}", k + 1
    used.add(name)
    return item if name == item.name else dataclasses.replace(item, name=name)


def _load_model(args):
    from . import api

    quiet_libraries()
    return api.load(args.preset, conditioning=args.conditioning, device=args.device)


def quiet_libraries() -> None:
    """Silence transformers' and diffusers' info/warning logs (load reports, deprecations): errors only. Used by
    every `uae-fast` command before loading models."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def one_line(text: str) -> str:
    """Escape newlines and tabs (JSON-style) so stdout stays one `name<TAB>caption` line per caption."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _report_skipped(out: Path | None, skipped: list) -> None:
    if not skipped:
        return
    for s in skipped:
        print(f"skipped {s.reason}", file=sys.stderr)
    if out is not None:
        from .io import write_text_atomic

        write_text_atomic(out / "skipped.json", json.dumps([vars(s) for s in skipped], indent=2) + "\n")
    print(f"uae-fast: skipped {len(skipped)} unreadable image(s)", file=sys.stderr)


def _require_some(rows: list, skipped: list) -> None:
    if not rows:
        raise ImageLoadError(f"no readable images: all {len(skipped)} input(s) were skipped")


def _total(args, paths: list[Path]) -> int:
    from .data.demo import DEMO_IMAGE_NAMES

    return len(paths) + (len(DEMO_IMAGE_NAMES) if args.demo else 0)


def cmd_caption(args) -> None:
    from .io import ensure_output_dir

    paths = _image_paths(args)
    out = ensure_output_dir(args.out) if args.out else None
    uae, skipped, rows = _load_model(args), [], []
    g = args.num_generations
    with _progress(_total(args, paths), "caption") as bar:
        for batch in _image_batches(args, paths, skipped):
            caps = uae.caption([b.image for b in batch], num_generations=g, seed=args.seed, **_caption_kwargs(args))
            for i, item in enumerate(batch):
                for k in range(g):
                    rows.append({"name": item.name, "source": item.path, "generation": k, "caption": caps[i * g + k]})
                    bar.write(f"{item.name}\t{one_line(caps[i * g + k])}", file=sys.stdout)
            bar.update(len(batch))
    _report_skipped(out, skipped)
    _require_some(rows, skipped)
    if out is not None:
        _write_jsonl(out / "captions.jsonl", rows)


def _read_captions(args) -> list[str]:
    captions = list(args.captions)
    where = [f"caption {i + 1}" for i in range(len(captions))]
    if args.captions_file is not None:
        path = args.captions_file
        if not path.is_file():
            raise ConfigError(f"--captions-file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--captions-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for n, line in enumerate(lines, 1):
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    caption = json.loads(line)["caption"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    caption = None
                if not isinstance(caption, str):
                    raise ConfigError(f"{path}:{n}: expected a JSON object with a string 'caption' field")
                line = caption
            captions.append(line)
            where.append(f"{path}:{n}")
    if not captions:
        raise ConfigError("no captions: give CAPTION arguments or --captions-file")
    for caption, place in zip(captions, where):
        if not caption.strip():
            raise ConfigError(f"{place}: empty caption; the decoder needs text to condition on")
    return captions


def cmd_generate(args) -> None:
    from .api import tensors_to_pil
    from .io import ensure_output_dir, save_image_atomic

    captions = _read_captions(args)
    out = ensure_output_dir(args.out)
    uae, rows = _load_model(args), []
    batch = 4
    with _progress(len(captions), "generate") as bar:
        for start in range(0, len(captions), batch):
            chunk = captions[start : start + batch]
            seeds = [args.seed + start + i for i in range(len(chunk))]
            images = tensors_to_pil(uae.generate_tensors(chunk, seed=seeds, **_generate_kwargs(args)))
            for i, (caption, image) in enumerate(zip(chunk, images)):
                name = f"{start + i:04d}.png"
                save_image_atomic(image, out / name)
                rows.append({"image": name, "caption": caption, "seed": seeds[i]})
            bar.update(len(chunk))
    _write_jsonl(out / "captions.jsonl", rows)


def cmd_reconstruct(args) -> None:
    from .io import ensure_output_dir, save_image_atomic

    paths = _image_paths(args)
    out = ensure_output_dir(args.out)
    uae, skipped, rows = _load_model(args), [], []
    g = args.num_generations
    kwargs = {**_caption_kwargs(args), **_generate_kwargs(args)}
    with _progress(_total(args, paths), "reconstruct") as bar:
        for batch in _image_batches(args, paths, skipped):
            result = uae.reconstruct([b.image for b in batch], num_generations=g, seed=args.seed, **kwargs)
            for i, item in enumerate(batch):
                for k in range(g):
                    name = f"{item.name}.png" if g == 1 else f"{item.name}_g{k}.png"
                    save_image_atomic(result.images[i * g + k], out / name)
                    rows.append(
                        {"name": item.name, "source": item.path, "image": name, "caption": result.captions[i * g + k]}
                    )
            bar.update(len(batch))
    _report_skipped(out, skipped)
    _require_some(rows, skipped)
    _write_jsonl(out / "captions.jsonl", rows)
    print(f"wrote {len(rows)} reconstruction(s) and captions.jsonl to {out}", file=sys.stderr)


def cmd_bench(args) -> None:
    from .eval.cli import cmd_bench as run

    run(args)


def cmd_train(args) -> None:
    from .train.cli import cmd_train as run

    run(args)


def cmd_data(args) -> int:
    from .data.cli import cmd_data as run

    return run(args)


COMMANDS = {
    "caption": cmd_caption,
    "generate": cmd_generate,
    "reconstruct": cmd_reconstruct,
    "bench": cmd_bench,
    "train": cmd_train,
    "data": cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        status = COMMANDS[args.command](args)  # `data check` exits 1 when it finds problems
    except UAEError as e:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"uae-fast: {rank}error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("uae-fast: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
