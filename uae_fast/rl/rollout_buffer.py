"""One RL step's rollouts in a C++ store, and their packing into variable-length micro-batches.

The arrays live in C++ (``uae_fast._C.RolloutBuffer``); the properties here are zero-copy numpy views (use
``torch.from_numpy`` or :meth:`RolloutBuffer.tensor` for tensors sharing the memory), so writing old log-probs or
rewards into a view writes into the buffer. While any view is alive the buffer refuses appends that would move its
storage (create it with enough capacity, or drop the views first).

:meth:`RolloutBuffer.pack` places sequences into micro-batches of at most ``token_budget`` tokens with
first-fit-decreasing and returns, per micro-batch, the flat token stream's indices, ``cu_seqlens`` and
``position_ids`` for variable-length attention -- no padding tokens at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MicroBatch", "PackedBatches", "RolloutBuffer", "pack_sequences"]

_SAMPLE_FIELDS = ("prompt_id", "group_id", "prompt_len", "reward", "advantage", "truncated", "skipped")
_TOKEN_FIELDS = ("tokens", "old_logprob", "ref_logprob")


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch (tensors share memory with :class:`PackedBatches`' arrays).

    Attributes:
        sample_index: ``[S_b]`` int64, the packed sequences' indices in the original order.
        token_index: ``[T_b]`` int64, index of each packed token in the unpacked flat token array (gather with it:
            ``input_ids = tokens[token_index]``; scatter results back with ``out[token_index] = values``).
        position_ids: ``[T_b]`` int64, 0-based position inside each sequence.
        cu_seqlens: ``[S_b + 1]`` int32, cumulative sequence lengths (flash-attention varlen layout).
        max_seqlen: Longest sequence in the micro-batch.
    """

    sample_index: torch.Tensor
    token_index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.numel())


@dataclass(frozen=True)
class PackedBatches:
    """The result of packing: micro-batches plus the maps between packed and original order.

    Attributes:
        batches: The micro-batches, largest first.
        order: ``[S]`` original sequence index at each packed position (micro-batch by micro-batch).
        inverse: ``[N]`` packed position of each original sequence, ``-1`` for sequences not packed (skipped).
        token_budget: The budget the micro-batches respect (an ``own_batch`` oversize sequence may exceed it).
    """

    batches: list[MicroBatch]
    order: torch.Tensor
    inverse: torch.Tensor
    token_budget: int

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)

    def padding_fraction(self) -> float:
        """Unused capacity if every micro-batch were padded to the budget (0 = perfectly full)."""
        capacity = sum(max(self.token_budget, b.num_tokens) for b in self.batches)
        return 1.0 - self.num_tokens / capacity if capacity else 0.0


def pack_sequences(
    lengths: Sequence[int] | np.ndarray,
    token_budget: int,
    *,
    offsets: Sequence[int] | np.ndarray | None = None,
    group_ids: Sequence[int] | np.ndarray | None = None,
    include: Sequence[bool] | np.ndarray | None = None,
    keep_groups: bool = False,
    oversize: str = "error",
    shared_prefix: Sequence[int] | np.ndarray | None = None,
) -> PackedBatches:
    """Packs ragged sequences into micro-batches of at most ``token_budget`` tokens (first-fit decreasing).

    Args:
        lengths: ``[N]`` tokens per sequence; included sequences must have at least one token.
        token_budget: Tokens per micro-batch.
        offsets: ``[N]`` start of each sequence in the flat token array (default: cumulative lengths).
        group_ids: ``[N]`` group of each sequence; required with ``keep_groups``.
        include: ``[N]`` mask; excluded sequences are not packed (``inverse`` -1).
        keep_groups: Put all sequences of a group in the same micro-batch (for losses normalised per group).
        oversize: What to do with a sequence (or kept group) longer than the budget: ``"error"`` (default, a
            ValueError naming it) or ``"own_batch"`` (it gets a micro-batch of its own, over budget).
        shared_prefix: ``[N]`` with ``keep_groups``: tokens of the prompt each sequence's group shares (forwarded
            once per group, like an image prompt before its G captions); counted once per group against the
            budget (read from the group's first sequence), not part of the packed tokens.

    Returns:
        The packed micro-batches, deterministic for the same input (ties keep input order).

    Raises:
        ValueError: a zero-length sequence, an oversize sequence with ``oversize="error"``, bad array shapes.
    """
    from uae_fast import _C

    inc = None if include is None else np.asarray(include, dtype=np.uint8)
    res = _C.pack_sequences(
        np.asarray(lengths, dtype=np.int64),
        int(token_budget),
        None if offsets is None else np.asarray(offsets, dtype=np.int64),
        None if group_ids is None else np.asarray(group_ids, dtype=np.int64),
        inc,
        bool(keep_groups),
        oversize,
        None if shared_prefix is None else np.asarray(shared_prefix, dtype=np.int64),
    )
    t = {k: torch.from_numpy(v) for k, v in res.items()}
    seq_off, tok_off = res["batch_seq_offsets"], res["batch_token_offsets"]
    batches = []
    for b in range(len(res["max_seqlen"])):
        s0, s1, t0, t1 = int(seq_off[b]), int(seq_off[b + 1]), int(tok_off[b]), int(tok_off[b + 1])
        batches.append(
            MicroBatch(
                sample_index=t["order"][s0:s1],
                token_index=t["token_index"][t0:t1],
                position_ids=t["position_ids"][t0:t1],
                # micro-batch b's cu_seqlens follow the b earlier ones, each one entry longer than its sequences
                cu_seqlens=t["cu_seqlens"][s0 + b : s1 + b + 1],
                max_seqlen=int(res["max_seqlen"][b]),
            )
        )
    return PackedBatches(batches=batches, order=t["order"], inverse=t["inverse"], token_budget=int(token_budget))


class RolloutBuffer:
    """Rollouts of one RL step: per sample ids, tokens, per-token log-probs, reward, advantage and flags.

    Args:
        sample_capacity: Samples to allocate for up front (appends beyond it reallocate, which is refused
            while views are alive).
        token_capacity: Tokens to allocate for up front.
    """

    def __init__(self, sample_capacity: int = 0, token_capacity: int = 0) -> None:
        from uae_fast import _C

        self._buf = _C.RolloutBuffer(int(sample_capacity), int(token_capacity))

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def num_tokens(self) -> int:
        return self._buf.num_tokens

    def add(
        self,
        prompt_id: int,
        group_id: int,
        tokens: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        prompt_len: int = 0,
        old_logprob: np.ndarray | torch.Tensor | None = None,
        ref_logprob: np.ndarray | torch.Tensor | None = None,
        reward: float = float("nan"),
        truncated: bool = False,
    ) -> int:
        """Appends one sample ``tokens`` ``[L]`` (``L >= 1``) and returns its index."""
        toks = _as_numpy(tokens, np.int64).reshape(-1)
        self.add_batch(
            [prompt_id],
            [group_id],
            [toks.size],
            toks,
            prompt_lens=[prompt_len],
            old_logprob=old_logprob,
            ref_logprob=ref_logprob,
            rewards=[reward],
            truncated=[truncated],
        )
        return len(self) - 1

    def add_batch(
        self,
        prompt_ids,
        group_ids,
        lengths,
        tokens,
        *,
        prompt_lens=None,
        old_logprob=None,
        ref_logprob=None,
        rewards=None,
        truncated=None,
    ) -> None:
        """Appends ``n`` samples at once; all or nothing.

        Args:
            prompt_ids: ``[n]`` int.
            group_ids: ``[n]`` int (samples of one prompt share a group in GRPO).
            lengths: ``[n]`` tokens per sample, each >= 1.
            tokens: ``[sum(lengths)]`` token ids, samples end to end.
            prompt_lens: ``[n]`` leading context tokens per sample (no loss), default 0.
            old_logprob: ``[sum(lengths)]`` float, default 0 (fill later through :attr:`old_logprob`).
            ref_logprob: ``[sum(lengths)]`` float, default 0.
            rewards: ``[n]`` float, default NaN (not scored yet).
            truncated: ``[n]`` bool, default False.

        Raises:
            ValueError: a zero-length sample, mismatched array lengths, or growth while views are alive.
        """

        def opt(x, dtype):
            return None if x is None else _as_numpy(x, dtype).reshape(-1)

        self._buf.add_batch(
            _as_numpy(prompt_ids, np.int64).reshape(-1),
            _as_numpy(group_ids, np.int64).reshape(-1),
            _as_numpy(lengths, np.int64).reshape(-1),
            _as_numpy(tokens, np.int64).reshape(-1),
            opt(prompt_lens, np.int64),
            opt(old_logprob, np.float32),
            opt(ref_logprob, np.float32),
            opt(rewards, np.float32),
            opt(truncated, np.uint8),
        )

    def clear(self) -> None:
        """Empties the buffer for the next step, keeping its memory."""
        self._buf.clear()

    def view(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a field (per sample: ``[N]``; per token: ``[T]``; ``offsets``: ``[N + 1]``)."""
        return self._buf.view(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy torch view of a field (see :meth:`view`)."""
        return torch.from_numpy(self._buf.view(name))

    def sequence(self, index: int) -> np.ndarray:
        """Token ids ``[L_i]`` of sample ``index`` (a view)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a buffer of {len(self)}")
        off = self.view("offsets")
        return self.view("tokens")[off[index] : off[index + 1]]

    def pack(
        self,
        token_budget: int,
        *,
        keep_groups: bool = False,
        oversize: str = "error",
        include_skipped: bool = False,
        include: np.ndarray | None = None,
        shared_prefix: Sequence[int] | np.ndarray | None = None,
    ) -> PackedBatches:
        """Packs this buffer's samples (skipped ones excluded unless ``include_skipped``, and only those where
        ``include`` [N] is true when given); see :func:`pack_sequences`. ``token_index`` indexes :attr:`tokens` /
        :attr:`old_logprob` directly. ``shared_prefix`` ``[N]`` (with ``keep_groups``): tokens of a prompt that
        is not stored here and that each sample's group shares (forwarded once, e.g. an image prompt before its
        G captions), charged once per group against the budget."""
        off = self.view("offsets")
        keep = None if include_skipped else ~self.view("skipped").astype(bool)
        if include is not None:
            include = np.asarray(include, dtype=bool)
            keep = include if keep is None else keep & include
        return pack_sequences(
            np.diff(off),
            token_budget,
            offsets=off[:-1],
            group_ids=self.view("group_id"),
            include=keep,
            keep_groups=keep_groups,
            oversize=oversize,
            shared_prefix=shared_prefix,
        )


def _field(name: str, doc: str) -> property:
    return property(lambda self: self.view(name), doc=doc)


for _name in _SAMPLE_FIELDS:
    setattr(RolloutBuffer, _name, _field(_name, f"``[N]`` zero-copy view of per-sample ``{_name}``."))
for _name in _TOKEN_FIELDS:
    setattr(RolloutBuffer, _name, _field(_name, f"``[T]`` zero-copy view of per-token ``{_name}``."))
RolloutBuffer.offsets = _field("offsets", "``[N + 1]`` sample i's tokens are ``tokens[offsets[i]:offsets[i + 1]]``.")


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)
