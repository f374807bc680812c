"""Reinforcement-learning pieces: GRPO for the captioner (Flow-GRPO for the decoder arrives with its issue)."""

__all__: list[str] = []
