"""Stage 2a trainer: update arithmetic, reference/conditioning with adapters off, bad input, checkpoints and resume."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

import uae_fast
from uae_fast.data.images import load_image
from uae_fast.errors import CheckpointError, ConfigError, ImageLoadError
from uae_fast.train import G4UTrainer, load_train_config
from uae_fast.train.metrics import MetricsLogger
from uae_fast.train.schedule import lr_factor


def make(tmp_path, *overrides, uae=None):
    base = [
        f"output_dir={tmp_path}",
        "batch_size=8",
        "num_generations=4",
        "max_steps=2",
        "decoder.steps=2",
        "report_images=0",
        "save_final_model=false",
        "tensorboard=false",
    ]
    return G4UTrainer(load_train_config("g4u_tiny", [*base, *overrides]), uae=uae)


def _lora_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.encoder.named_parameters() if p.requires_grad}


def _sgd_delta(trainer) -> tuple[dict[str, torch.Tensor], float]:
    """Parameter change of one update with plain SGD (lr 1): minus the accumulated gradient, unnormalised; and the
    logged loss."""
    params = trainer.policy.trainable_parameters()
    trainer.optimizer = torch.optim.SGD(params, lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    before = _lora_state(trainer)
    batch = trainer.rollout(trainer.dataset.next_batch(trainer.config.images_per_step))
    trainer.reconstruct(batch)
    trainer.score(batch)
    # Advantages that do not sum to 0, so the batch loss is far from 0 and a 1/K logging error would show.
    batch.advantages = torch.linspace(-0.5, 1.5, len(batch.advantages))
    loss = trainer.update([batch])["loss"]
    return {n: p - before[n] for n, p in _lora_state(trainer).items()}, loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_whole_batch(tmp_path, loss_type):
    """Gradient accumulation over one-group micro-batches == one pass over the whole batch, per loss type; the
    logged loss is the whole batch's loss too (it was ~1/K of it for dapo with K micro-batches)."""
    common = [f"loss.loss_type={loss_type}", "max_grad_norm=0"]
    whole, whole_loss = _sgd_delta(make(tmp_path / "a", *common, "micro_batch_tokens=100000"))
    split, split_loss = _sgd_delta(make(tmp_path / "b", *common, "micro_batch_tokens=1"))  # every group on its own
    assert any(d.abs().max() > 0 for d in whole.values())
    assert abs(whole_loss) > 0.1 and split_loss == pytest.approx(whole_loss, rel=1e-4)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4)


def test_kl_is_zero_at_the_start_and_positive_later(tmp_path):
    trainer = make(tmp_path, "loss.beta=0.1", "max_steps=4")
    first = trainer.train_step()
    assert abs(first["kl"]) < 1e-6  # LoRA B starts at 0: the policy is its reference
    later = [trainer.train_step()["kl"] for _ in range(3)]
    assert later[-1] > 1e-6


def test_num_iterations_reuses_the_rollout(tmp_path):
    trainer = make(tmp_path, "num_iterations=2")
    metrics = trainer.train_step()
    assert trainer.scheduler.last_epoch == 2  # two optimizer steps on one rollout
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
    assert "clip_ratio/region_mean" in metrics


def test_group_shares_noise_and_step_reports_every_phase(tmp_path):
    trainer = make(tmp_path)
    batch = trainer.rollout(trainer.dataset.next_batch(2))
    assert batch.noise_seeds[:4] == [batch.noise_seeds[0]] * 4 and batch.noise_seeds[4] != batch.noise_seeds[0]
    metrics = trainer.train_step()
    for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length",
                "completions/median_length", "time/rollout", "time/reconstruct", "time/score", "time/update",
                "rollout/tokens_per_s", "reconstruct/images_per_s", "samples_per_s"):  # fmt: skip
        assert key in metrics, key


def test_conditioning_uses_the_base_model(tmp_path):
    """By default the decoder sees the frozen base LLM, however far the adapters have moved."""
    trainer = make(tmp_path)
    with torch.no_grad():
        for name, p in trainer.policy.encoder.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    batch = trainer.rollout(trainer.dataset.next_batch(2))
    trainer.reconstruct(batch)
    fresh = uae_fast.load("tiny", device="cpu")
    expected = fresh.generate_tensors(batch.captions, seed=batch.noise_seeds, steps=2, guidance=1.0, size=64,
                                      allow_empty=True)  # fmt: skip
    torch.testing.assert_close(batch.reconstructions, expected, atol=1e-5, rtol=0)
    moving = make(tmp_path / "m", "decoder.adapters_in_conditioning=true", uae=trainer.uae)
    moving.reconstruct(batch)
    assert not torch.allclose(batch.reconstructions, expected, atol=1e-4)


class _EditedReward:
    """Wraps the trainer's reward and edits its output (invalid samples, constant rewards)."""

    def __init__(self, reward, edit):
        self.reward, self.edit = reward, edit

    def __call__(self, *args, **kwargs):
        out = self.reward(*args, **kwargs)
        self.edit(out)
        return out


def test_nan_rewards_are_masked_and_counted(tmp_path):
    trainer = make(tmp_path)

    def invalidate(out):
        out.valid[::3] = False

    trainer.reward = _EditedReward(trainer.reward, invalidate)
    batch = trainer.rollout(trainer.dataset.next_batch(2))
    trainer.reconstruct(batch)
    trainer.score(batch)
    assert torch.isnan(batch.rewards[::3]).all() and (batch.advantages[::3] == 0).all()
    assert batch.stats.num_invalid_rewards == 3
    metrics = trainer.train_step()
    assert metrics["reward/invalid"] == 3 and torch.isfinite(torch.tensor(metrics["loss"]))


def _step_with_tied_rewards(trainer):
    """One step whose every reward is 0.5 (all groups tied): (the adapters before it, its metrics)."""

    def constant(out):
        out.rewards.fill_(0.5)

    trainer.reward = _EditedReward(trainer.reward, constant)
    before = _lora_state(trainer)
    return before, trainer.train_step()


def test_all_equal_rewards_skip_the_update(tmp_path):
    trainer = make(tmp_path)
    before, metrics = _step_with_tied_rewards(trainer)
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["update/sequences"] == 0
    assert all(torch.equal(p, before[n]) for n, p in _lora_state(trainer).items())
    assert trainer.scheduler.last_epoch == 1  # the schedule still advanced: it ends at max_steps as planned


def test_entropy_bonus_still_updates_on_tied_groups(tmp_path):
    """With loss.entropy_coef > 0 a tied group still has a gradient (the bonus): no sequence is skipped."""
    trainer = make(tmp_path, "loss.entropy_coef=0.1")
    before, metrics = _step_with_tied_rewards(trainer)
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["update/sequences"] == 8
    assert any(not torch.equal(p, before[n]) for n, p in _lora_state(trainer).items())


def _image_folder(path, demo, bad: bool):
    path.mkdir()
    for i, image in enumerate(demo):
        image.save(path / f"img{i}.png")
    if bad:
        (path / "img1b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


def test_bad_image_mid_run_is_skipped_and_counted(tmp_path, demo):
    folder = _image_folder(tmp_path / "data", demo, bad=True)
    trainer = make(tmp_path / "run", f"data.images={folder}", "data.shuffle=false")
    trainer.train()  # step 2 draws img1b.jpg (file order), skips it and fills the batch with img2
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert [s["image"] for s in skipped] == ["img1b.jpg"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/skipped_images"] == 1


def test_bad_image_can_abort(tmp_path, demo):
    folder = _image_folder(tmp_path / "data", demo, bad=True)
    trainer = make(tmp_path / "run", f"data.images={folder}", "data.shuffle=false", "data.on_bad_image=abort")
    trainer.train_step()
    with pytest.raises(ImageLoadError, match="img1b.jpg"):
        trainer.train_step()


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.images: .*no image files"):
        make(tmp_path / "run", f"data.images={tmp_path / 'empty'}")


def test_resume_is_exact(tmp_path, kill_at_step):
    """4 steps straight == 2 steps, a crash, then resume to 4: same adapter weights, bit for bit (CPU, fp32)."""
    common = ["max_steps=4", "save_steps=2", "lora.dropout=0.1"]  # dropout: the global RNG must be restored too
    straight = make(tmp_path / "a", *common)
    straight.train()

    interrupted = make(tmp_path / "b", *common)
    kill_at_step(interrupted, 2)
    resumed = make(tmp_path / "b", *common, "resume=auto")
    resumed.train()
    assert resumed.step == 4
    a, b = _lora_state(straight), _lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_resume_refuses_a_different_config(tmp_path):
    make(tmp_path, "max_steps=1").train()
    with pytest.raises(ConfigError, match="different config: learning_rate"):
        make(tmp_path, "max_steps=2", "learning_rate=0.1", "resume=auto").train()
    with pytest.raises(CheckpointError, match="not found"):
        make(tmp_path, "max_steps=2", f"resume={tmp_path / 'nope'}").train()


def test_accumulation_and_reference_caption_length(tmp_path, demo):
    folder = _image_folder(tmp_path / "data", demo, bad=False)
    (folder / "img0.txt").write_text("a tabby cat on a red sofa")  # a sidecar reference caption
    trainer = make(tmp_path / "run", f"data.images={folder}", "data.shuffle=false", "gradient_accumulation_steps=2")
    metrics = trainer.train_step()
    assert trainer.dataset.draws == 4  # 2 rollout chunks x 2 images, one optimizer step
    assert trainer.scheduler.last_epoch == 1
    expected = len(trainer.policy.tokenizer("a tabby cat on a red sofa").input_ids)
    assert metrics["completions/reference_mean_length"] == expected


def test_each_image_is_decoded_once_per_step_for_policy_and_reward(tmp_path, demo):
    """The native data path: file bytes → one ImageDecoder call per step → the same arrays to the captioner's C++
    preprocessing and to the reward; pixels equal Pillow's (load_image)."""
    folder = _image_folder(tmp_path / "data", demo, bad=False)
    trainer = make(tmp_path / "run", f"data.images={folder}", "data.shuffle=false")
    calls, seen = [], {}
    decode = trainer.dataset.decoder.decode
    trainer.dataset.decoder.decode = lambda blobs, **kw: calls.append(len(blobs)) or decode(blobs, **kw)
    encode, reward = trainer.policy.encode_images, trainer.reward
    trainer.policy.encode_images = lambda images, **kw: seen.setdefault("policy", images) and encode(images, **kw)
    trainer.reward = lambda sources, *a, **kw: seen.setdefault("reward", sources) and reward(sources, *a, **kw)
    trainer.train_step()
    assert calls == [2]  # one batch of 2 images, decoded once
    assert all(p is r for p, r in zip(seen["policy"], seen["reward"]))
    for i, pixels in enumerate(seen["policy"]):
        assert np.array_equal(pixels, np.asarray(load_image(folder / f"img{i}.png")))


def test_a_folder_holding_a_run_is_refused_before_loading(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoint-40").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 40}\n')
    import uae_fast.api

    monkeypatch.setattr(uae_fast.api, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(ConfigError, match="already holds a run .*--resume .*--overwrite"):
        uae_fast.train("g4u_tiny", [f"output_dir={run}"])
    with pytest.raises(ConfigError, match="exclude each other"):
        uae_fast.train("g4u_tiny", [f"output_dir={run}", "resume=auto", "overwrite=true"])


def test_overwrite_replaces_the_old_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-40").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 40, "reward": 9}\n')
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    make(run, "max_steps=1", "overwrite=true").train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    make(tmp_path / "run", "max_steps=1", "resume=auto").train()
    assert "no checkpoint in" in capsys.readouterr().err and (tmp_path / "run" / "checkpoint-1").is_dir()


def test_resume_tolerates_a_torn_metrics_line(tmp_path):
    """A crash mid-write leaves half a JSON line: resume drops it and logs each step once."""
    make(tmp_path, "max_steps=2", "save_steps=2").train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # the crash
    make(tmp_path, "max_steps=3", "save_steps=2", "resume=auto").train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_job_logs_get_one_line_per_logging_step(tmp_path):
    """Outside a terminal tqdm prints nothing: the logger writes a plain line per logging step instead."""
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path, total_steps=4, tensorboard=False, stream=stream)
    for step in (1, 2):
        logger.log(step, {"reward": 0.25, "kl": 0.5, "samples_per_s": 8.0})
        logger.advance()
    logger.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("step 2/4 | reward 0.25 | kl 0.5 | samples/s 8 | eta ")


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule(kind):
    warmup, total = 2, 10
    expected = {
        "constant": lambda p: 1.0,
        "linear": lambda p: 1 - p,
        "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
    }
    for update in range(12):
        want = (update + 1) / 3 if update < warmup else expected[kind](min((update - 2) / 8, 1.0))
        assert lr_factor(update, warmup=warmup, total=total, kind=kind) == pytest.approx(want)
