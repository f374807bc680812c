"""Stage 2b learns, shown against a control (the issue's criterion; README "Does stage 2b learn?").

The shipped `u4g_tiny` config, 30 steps, the same seed twice — once as is, once with the advantages negated. σ₀ =
within-group reward std at step 1, Δ = mean reward of the last 5 steps − the first 5. Pass: Δ(+) > 0 and
Δ(+) − Δ(−) ≥ 5σ₀. A rising reward alone proves nothing: on the tiny random models any change of the DiT's velocity
tends to lift the (negative) cosine reward towards 0, for the negated run too.

Seeds: tuning used seeds 0–9 and 1000–1019 only; evaluations on fresh seeds are in the README. The CI seeds 8900 and
8901 were fixed before they were first run and never tuned on.

Known failure: no setting tried of the config's levers (lr, noise level, SDE window, LoRA targets/rank, batch,
render size) made stage 2b pass on the tiny preset; the test is a strict xfail until one does (then drop the mark).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from uae_fast.train import load_train_config
from uae_fast.train.u4g import U4GTrainer

STEPS = 30


def _rewards(tmp_path, seed: int, negate: bool) -> tuple[list[float], float]:
    config = load_train_config(
        "u4g_tiny",
        [f"output_dir={tmp_path}", f"seed={seed}", f"negate_advantages={str(negate).lower()}", f"max_steps={STEPS}"],
    )
    trainer = U4GTrainer(config)
    metrics = [trainer.train_step() for _ in range(config.max_steps)]
    return [m["reward"] for m in metrics], metrics[0]["reward_std"]


@pytest.fixture
def one_thread():
    """The tiny models gain nothing from a second thread, and on shared cores two threads can run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="stage 2b does not yet learn on the tiny preset (README 'Does stage 2b learn?')")
@pytest.mark.parametrize("seed", [8900, 8901])
def test_decoder_reward_rises_with_advantages_and_not_against_them(tmp_path, seed, one_thread):
    plus, sigma0 = _rewards(tmp_path / "plus", seed, negate=False)
    minus, _ = _rewards(tmp_path / "minus", seed, negate=True)

    def delta(r):
        return statistics.mean(r[-5:]) - statistics.mean(r[:5])

    assert sigma0 > 0
    gain, control = delta(plus) / sigma0, delta(minus) / sigma0
    assert gain > 0, f"Δ(+) = {gain:.2f}σ₀ <= 0"
    assert gain - control >= 5.0, f"Δ(+) − Δ(−) = {gain - control:.2f}σ₀ < 5σ₀ (Δ(−) = {control:.2f}σ₀)"
