"""The scale-out pieces in one process: clipping, metric merging, the rank-interleaved image stream and its resume
on another world size, config errors."""

from __future__ import annotations

import pytest
import torch

from uae_fast.dist.engines import Engine, clip_grad_norm, transformer_blocks
from uae_fast.dist.runtime import Runtime
from uae_fast.errors import ConfigError
from uae_fast.train.config import DataConfig, load_train_config
from uae_fast.train.data import open_dataset
from uae_fast.train.loop import merge_rank_metrics


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 3), (5,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [p.detach().clone().requires_grad_() for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf"))
    norm = clip_grad_norm(params, max_norm, Runtime())
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for r, p in zip(ref, params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("error")  # a part's schedule must not think its optimizer never stepped
def test_a_joint_optimizer_steps_as_its_parts_each_on_its_own_schedule():
    """DeepSpeed takes one optimizer: the cold start's two become one over their param groups, and each part's LR
    schedule (here two different ones) must still set the learning rate the joint optimizer steps with."""
    from uae_fast.dist.zero import _joint

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    twins = [torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)]
    for twin, model in zip(twins, (a, b)):
        twin.load_state_dict(model.state_dict())
    parts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in (a, b)]
    refs = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in twins]
    joint = _joint(parts)
    decays = (lambda step: 0.5**step, lambda step: 1.0 / (1 + step))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, f) for o, f in zip(parts, decays)]
    ref_schedules = [torch.optim.lr_scheduler.LambdaLR(o, f) for o, f in zip(refs, decays)]
    x = torch.randn(8, 4)
    for _ in range(3):
        b(a(x)).pow(2).mean().backward()
        joint.step()
        joint.zero_grad()
        twins[1](twins[0](x)).pow(2).mean().backward()
        for optimizer in refs:
            optimizer.step()
            optimizer.zero_grad()
        for schedule in [*schedules, *ref_schedules]:
            schedule.step()
    for model, twin in zip((a, b), twins):
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    assert [g["lr"] for g in joint.param_groups] == pytest.approx([0.1 * 0.5**3, 0.1 / 4])


def test_one_process_engine_backward_and_step_are_plain_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    engine = Engine(Runtime())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine.attach([model], [optimizer], max_grad_norm=1.0)
    reference = torch.optim.AdamW(twin.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    engine.backward(model(x).pow(2).mean())
    engine.step([optimizer])
    twin(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None
    state = engine.optimizer_state(optimizer)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine.load_optimizer_state(fresh, state)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fresh.state_dict()["state"][0][key], reference.state_dict()["state"][0][key])


def test_merge_rank_metrics_sums_counts_and_rates_and_averages_the_rest():
    merged = merge_rank_metrics(
        [
            {"reward": 1.0, "update/sequences": 8, "samples_per_s": 10.0, "eval/only_here": 3.0, "memory/peak_gb": 2},
            {"reward": 3.0, "update/sequences": 4, "samples_per_s": 30.0, "memory/peak_gb": 5},
        ]
    )
    assert merged == {"reward": 2.0, "update/sequences": 12.0, "samples_per_s": 40.0, "eval/only_here": 3.0,
                      "memory/peak_gb": 5.0}  # fmt: skip


def test_ranks_draw_the_one_process_stream_interleaved_and_resume_on_another_world_size():
    one = open_dataset(DataConfig(), seed=3)
    stream = [im.key for im in one.next_batch(6)]  # 6 > 4 demo images: crosses an epoch
    ranks = [open_dataset(DataConfig(), seed=3, rank=r, world_size=2) for r in (0, 1)]
    drawn = [[im.key for im in d.next_batch(3)] for d in ranks]
    assert [drawn[i % 2][i // 2] for i in range(6)] == stream
    assert [d.epoch for d in ranks] == [one.epoch, one.epoch] == [1, 1]
    # rank 0's state, resumed by one process, continues the stream where the two ranks stopped
    again = open_dataset(DataConfig(), seed=3)
    again.load_state_dict(ranks[0].state_dict())
    assert [im.key for im in again.next_batch(2)] == [im.key for im in one.next_batch(2)]
    # and a one-process state resumed by two ranks
    halves = [open_dataset(DataConfig(), seed=3, rank=r, world_size=2) for r in (0, 1)]
    for d in halves:
        d.load_state_dict(one.state_dict())
    nxt = [im.key for im in one.next_batch(4)]
    parts = [[im.key for im in d.next_batch(2)] for d in halves]
    assert [parts[i % 2][i // 2] for i in range(4)] == nxt


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    from types import SimpleNamespace

    from uae_fast.train.loop import StageTrainer

    on_three = SimpleNamespace(runtime=Runtime(rank=1, world_size=3))
    assert StageTrainer.share(on_three, 6, "pretrain.batch_size") == 2
    with pytest.raises(ConfigError, match=r"pretrain.batch_size = 4 does not split over 3 processes: make it a multi"):
        StageTrainer.share(on_three, 4, "pretrain.batch_size")


def test_bad_distributed_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="distributed.engine must be one of ddp, fsdp2, zero2, zero3, got 'zero9'"):
        load_train_config("g4u_tiny", ["distributed.engine=zero9"])
    with pytest.raises(ConfigError, match="distributed.timeout_s must be > 0"):
        load_train_config("g4u_tiny", ["distributed.timeout_s=0"])
    with pytest.raises(ConfigError, match="distributed.shard_frozen needs distributed.engine=fsdp2, got 'zero3'"):
        load_train_config("g4u_tiny", ["distributed.shard_frozen=true", "distributed.engine=zero3"])
    with pytest.raises(ConfigError, match=r"frozen model of stage g4u \(the decoder\) or u4g .*, got stage 'unified'"):
        load_train_config("unified_tiny", ["distributed.shard_frozen=true", "distributed.engine=fsdp2"])


def test_on_main_returns_the_result_and_raises_the_error():
    runtime = Runtime()
    assert runtime.on_main(lambda: 7) == 7
    with pytest.raises(ConfigError, match="boom"):
        runtime.on_main(lambda: (_ for _ in ()).throw(ConfigError("boom")))


def test_transformer_blocks_are_the_trained_stacks_only():
    class Tower(torch.nn.Module):  # the shape of a VLM: a frozen vision stack, a trained LLM stack, a head
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2))
                for _ in range(4)
            )
            self.head = torch.nn.Linear(2, 2)

    tower = Tower().requires_grad_(False)
    for layer in tower.layers:
        layer[0].weight.requires_grad_(True)
    assert [id(b) for b in transformer_blocks(tower)] == [id(layer) for layer in tower.layers]
    # a frozen model's blocks: every stack entry, trained or not (the outermost stacks only)
    whole = [id(b) for b in transformer_blocks(tower, trained_only=False)]
    assert whole == [id(b) for b in [*tower.vision, *tower.layers]]
