"""Evaluation: Unified-Bench (Protocol 1) — scoring, the HTML report and the ``uae-fast bench`` commands."""

__all__: list[str] = []
