"""Stage 2a learns, shown against a control (issue 6's criterion, `../shared/STACK-NOTES.md`).

Same seed twice — once as is, once with the advantages negated. σ₀ = within-group reward std at step 0, Δ = mean
reward of the last 5 steps − the first 5. Pass: Δ(+) ≥ 1.5σ₀ and Δ(+) − Δ(−) ≥ 3σ₀. A rising reward alone would
prove nothing (a collapsing policy can lift a low reward too); the negated run must do clearly worse.

Seeds: the config was chosen on seeds 0–9 and 5, 6, 1000, 1001 (scale_rewards=batch); evaluated once on the fresh
seeds 3000–3009 (8/10 pass, table in the README); the CI seeds 4000 and 4001 were fixed before they were run.
"""

from __future__ import annotations

import pytest

from uae_fast.train import load_train_config


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4000, 4001])
def test_reward_rises_with_advantages_and_not_against_them(tmp_path, seed, control_pair):
    assert load_train_config("g4u_tiny").max_steps == 40  # the shipped tiny config is what is tested
    gain, control = control_pair("g4u_tiny", tmp_path, seed)
    assert gain >= 1.5, f"Δ(+) = {gain:.2f}σ₀ < 1.5σ₀"
    assert gain - control >= 3.0, f"Δ(+) − Δ(−) = {gain - control:.2f}σ₀ < 3σ₀ (Δ(−) = {control:.2f}σ₀)"
