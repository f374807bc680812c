"""Stage 1 trainer: the step's loss is the rectified-flow loss of the model as loaded, what trains and what stays
frozen, gradient checkpointing and the cache change nothing, exact resume with an EMA, the released layout of the
result (LoRA and full fine-tuning), the resolution schedule and bad input."""

from __future__ import annotations

import pytest
import torch

import uae_fast
from uae_fast.errors import ConfigError, UAEError
from uae_fast.train import PretrainTrainer, load_train_config
from uae_fast.train.flow_matching import noisy_latents
from uae_fast.train.seeds import stable_seed

FAST = ["report_images=0", "save_final_model=false", "tensorboard=false"]


def make(tmp_path, *overrides, uae=None):
    base = [f"output_dir={tmp_path}", "max_steps=2", "pretrain.batch_size=2", "pretrain.finetune=lora"]
    return PretrainTrainer(load_train_config("pretrain_tiny", [*base, *FAST, *overrides]), uae=uae)


def _trained(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for g in trainer.optimizer.param_groups for n, p in enumerate(g["params"])}


def test_step_loss_is_the_rectified_flow_loss_of_the_loaded_model(tmp_path):
    """Recompute the first step's loss by hand with a fresh copy of the model: the draws line up (the step's pairs,
    latents, σ and noise from the step's seed), the conditioning is the UAE's own, the target is ε − x₀ (weights 1
    for SD3's logit-normal scheme)."""
    trainer = make(tmp_path, "pretrain.eval_images=0")
    reference = uae_fast.load("tiny", seed=0)
    twin = make(tmp_path / "twin", "pretrain.eval_images=0")  # only its data stream and draws are used
    pairs = twin.next_pairs(2)
    generator = torch.Generator().manual_seed(stable_seed(0, 0, 1))
    latents = twin.latents(pairs, twin.config.pretrain.resolution_at(0), generator)
    sigmas = twin.sigmas(2, generator)
    noise = torch.randn(latents.shape, generator=generator)
    with torch.no_grad():
        embeds, mask, pooled = reference.condition([p.reference_caption for p in pairs])
        prediction = reference.decoder.velocity(noisy_latents(latents, noise, sigmas), sigmas, embeds, mask, pooled)
    expected = float(((prediction - (noise - latents)) ** 2).mean())
    assert trainer.train_step()["loss"] == pytest.approx(expected, rel=1e-5)


def test_what_trains_and_what_stays_frozen(tmp_path):
    trainer = make(tmp_path, "max_steps=1")
    encoder = trainer.uae.encoder
    before_llm = {n: p.clone() for n, p in encoder.model.named_parameters()}
    before_proj = {n: p.detach().clone() for n, p in encoder.projector.named_parameters()}
    before_vae = {n: p.clone() for n, p in trainer.uae.decoder.vae.named_parameters()}
    trainer.train_step()
    assert all(torch.equal(p, before_llm[n]) for n, p in encoder.model.named_parameters())
    assert all(torch.equal(p, before_vae[n]) for n, p in trainer.uae.decoder.vae.named_parameters())
    assert any(not torch.equal(p, before_proj[n]) for n, p in encoder.projector.named_parameters())
    lora = [n for n, p in trainer.uae.decoder.transformer.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    frozen_projector = make(tmp_path / "b", "pretrain.train_projector=false")
    assert not any(p.requires_grad for p in frozen_projector.uae.encoder.projector.parameters())
    assert set(frozen_projector.adapters()) == {"dit_lora"}


def test_checkpointing_and_cache_change_no_value(tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["pretrain.gradient_checkpointing=true"]),
                        ("uncached", ["pretrain.conditioning_cache=0"])):  # fmt: skip
        trainer = make(tmp_path / name, "max_steps=3", "pretrain.eval_images=0", *extra)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        runs[name] = (losses, _trained(trainer))
    for name in ("checkpointed", "uncached"):
        assert runs[name][0] == pytest.approx(runs["plain"][0], rel=1e-5, abs=1e-7)
        for k, v in runs["plain"][1].items():
            torch.testing.assert_close(runs[name][1][k], v, rtol=1e-4, atol=1e-6)


def test_cache_reuses_each_caption_across_epochs(tmp_path):
    trainer = make(tmp_path, "max_steps=4", "pretrain.eval_images=0")
    for _ in range(4):
        metrics = trainer.train_step()
    assert metrics["data/epoch"] >= 1
    assert metrics["conditioning/cache_misses"] == 4 and metrics["conditioning/cache_hits"] == 4  # 4 demo captions


def test_resume_with_ema_matches_an_uninterrupted_run(tmp_path, kill_at_step):
    common = ["max_steps=4", "save_steps=1", "pretrain.ema_decay=0.5", "save_final_model=true"]
    full = make(tmp_path / "full", *common)
    full.train()
    killed = make(tmp_path / "killed", *common)
    kill_at_step(killed, 2)
    resumed = make(tmp_path / "killed", *common, "resume=auto")
    assert resumed.step == 0
    resumed.train()
    assert resumed.step == 4
    # Equal to fp32 rounding: after the resume the caption cache is rebuilt, and the LLM pass over a batch of
    # different captions rounds differently in the last bit.
    for k, v in full.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(_trained(full).items(), _trained(resumed).items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # final/ holds the EMA weights, in the released layout, loadable by uae_fast.load
    loaded = uae_fast.load(tmp_path / "full" / "final")
    with full.ema.applied():
        expected = {n: p.detach().clone() for n, p in full.uae.encoder.projector.named_parameters()}
    for n, p in loaded.encoder.projector.named_parameters():
        torch.testing.assert_close(p, expected[n])
    assert (tmp_path / "full" / "final" / "dit_lora").is_dir()


def test_full_finetune_saves_full_dit_weights(tmp_path):
    trainer = make(tmp_path, "pretrain.finetune=full", "pretrain.train_projector=false", "save_final_model=true",
                   "pretrain.learning_rate=1e-2", "report_images=2")  # fmt: skip
    initial = {n: p.detach().clone() for n, p in trainer.uae.decoder.transformer.named_parameters()}
    trainer.train()
    assert set(trainer.adapters()) == {"dit"}
    loaded = uae_fast.load(tmp_path / "final")
    changed = 0
    for n, p in loaded.decoder.transformer.named_parameters():
        torch.testing.assert_close(p, dict(trainer.uae.decoder.transformer.named_parameters())[n].detach())
        changed += not torch.equal(p, initial[n])
    assert changed > 10 and not (tmp_path / "final" / "dit_lora").exists()
    report = (tmp_path / "report" / "index.html").read_text()  # the trained decoder's renders of the own captions
    assert "own captions" in report and report.count("_trained.png") == 2


def test_resolution_schedule_switches_the_trained_size(tmp_path):
    trainer = make(tmp_path, "max_steps=3", "pretrain.resolutions=[[0,16],[2,32]]", "pretrain.eval_images=0")
    assert [trainer.train_step()["resolution"] for _ in range(3)] == [16, 16, 32]


def test_images_without_captions_are_refused_or_skipped(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(ConfigError, match="no training image has a caption"):
        make(tmp_path / "a", f"data.images={folder}").train_step()
    (folder / "0.txt").write_text("a red square on black")
    (folder / "1.txt").write_text("red")
    trainer = make(tmp_path / "b", f"data.images={folder}", "pretrain.min_caption_words=2", "pretrain.eval_images=0")
    for _ in range(3):  # several epochs of the three images: each skipped one is listed once
        metrics = trainer.train_step()
    assert len(trainer.dataset.skipped) == 2
    reasons = {s["image"]: s["reason"] for s in trainer.dataset.skipped}
    assert reasons["1.png"].startswith("caption of 1 words") and reasons["2.png"] == "no caption"
    assert metrics["data/skipped_images"] >= 2


@pytest.mark.parametrize(
    "setting, message",
    [
        ("pretrain.resolutions=[[5,64]]", "must start at step 0"),
        ("pretrain.resolutions=[[0,60]]", "multiple of 8"),
        ("pretrain.weighting_scheme=cosine", "weighting_scheme must be one of"),
        ("pretrain.finetune=half", "finetune must be one of"),
        ("pretrain.ema_decay=1.0", "ema_decay must be in"),
        ("pretrain.lora_targets=[nothing]", "match no linear layer"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message) as info:
        make(tmp_path, setting)
    assert "\n" not in str(info.value)


def test_a_non_finite_loss_stops_with_a_message(tmp_path):
    trainer = make(tmp_path, "pretrain.eval_images=0")
    with torch.no_grad():
        next(p for p in trainer.uae.decoder.transformer.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(UAEError, match="the loss is nan"):
        trainer.train_step()


def test_aspect_buckets_train_each_batch_at_its_bucket_shape(tmp_path):
    """Shards of landscape and portrait images: each batch is one bucket, encoded at that bucket's shape."""
    import io

    import numpy as np
    from PIL import Image

    from uae_fast.data.shard_io import write_shard
    from uae_fast.data.shards import aspect_bucket

    samples = []
    for i in range(8):
        h, w = (40, 80) if i % 2 else (80, 40)
        buffer = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(buffer, format="PNG")
        samples.append({"key": f"im{i}", "image": buffer.getvalue(), "ext": "png", "caption": f"a grey picture {i}"})
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "shard-000000.tar", samples)
    with pytest.raises(ConfigError, match="aspect_buckets needs"):
        make(tmp_path / "small", f"data.shards={tmp_path / 'shards'}", "data.aspect_buckets=true")
    trainer = make(tmp_path / "run", f"data.shards={tmp_path / 'shards'}", "data.aspect_buckets=true",
                   "pretrain.resolutions=[[0,64]]", "pretrain.eval_images=0")  # fmt: skip
    shapes = []
    encode = trainer.latents

    def recording(pairs, side, generator, share=None):
        latents = encode(pairs, side, generator, share=share)
        shapes.append(tuple(latents.shape[2:]))
        return latents

    trainer.latents = recording
    for _ in range(3):
        trainer.train_step()
    expected = {(h // 8, w // 8) for h, w in (aspect_bucket(40, 80, 64), aspect_bucket(80, 40, 64))}
    assert set(shapes) == expected
