"""The captioner's token loop over the static, prefix-shared KV cache, and its exact token sampler.

Per token: LM head -> special tokens masked -> one uniform number per row -> inverse-CDF draw, all on the device.
The host reads the device only every `sync_every` tokens (are all rows done? which rows to drop?) and at the end.
Finished rows keep emitting pad ids until then, and are dropped at the check by moving the live rows to the front of
the same buffers (`PrefixSharedKVCache.keep`). Uniform numbers are drawn for all B·G rows every token, live or not,
so a seeded generator gives the same captions whichever rows were dropped when.

On CUDA the decode step is captured in a CUDA graph per live-row count (counts are kept to powers of two there, so
there are few graphs) and replayed; on a CPU the same step runs eagerly, attending to the filled slots only.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .kv_cache import PrefixSharedKVCache, decode_step

__all__ = ["sample_token", "sample_tokens", "CudaGraphStep", "PackedHead"]


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator, *, uniform=None, inplace: bool = False
) -> torch.Tensor:
    """[N, V] logits → [N] tokens: greedy at temperature 0, else temperature + nucleus sampling.

    Nucleus: the smallest prefix (by descending probability) whose mass reaches `top_p`, renormalised — as
    transformers' `TopPLogitsWarper`. Sampling inverts the CDF with one uniform number per row (`uniform` [N, 1] in
    [0, 1), else drawn from `generator`): `torch.multinomial` draws per vocabulary entry, and over Qwen's 151,936
    entries that was 20x slower (132 vs 6.4 ms for 32 rows on 2 CPU cores). At top_p = 1 the CDF is inverted in two
    levels (sums of blocks of 128 entries, then a cumulative sum inside the chosen block only): a read-only pass
    replaces the full-width cumulative sum. `inplace` lets it overwrite `logits` (float32, contiguous).
    """
    if temperature == 0:
        return logits.argmax(-1)
    n, vocab = logits.shape
    if uniform is None:
        uniform = torch.rand((n, 1), generator=generator, device=logits.device)
    x = logits if inplace and logits.dtype == torch.float32 else logits.float().clone()
    block = _block_size(vocab)
    order = None
    if top_p < 1.0 or block is None:
        _exp_shifted_(x, temperature)
        if top_p < 1.0:
            x, order = (x / x.sum(-1, keepdim=True)).sort(dim=-1, descending=True)
            x = x.masked_fill(x.cumsum(-1) - x > top_p, 0.0)  # smallest prefix reaching top_p
        cdf = x.cumsum(-1)
        # right=True: the first entry whose cdf exceeds u, so a zero-probability entry is never chosen (even at u = 0).
        index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
        return (index if order is None else order.gather(1, index)).squeeze(-1)
    blocks = _unnormalised_block_sums(x, temperature, block)  # [N, V/128]; x now holds exp(x/T - max)
    cum = blocks.cumsum(-1)
    target = uniform * cum[:, -1:]
    b = torch.searchsorted(cum, target, right=True).clamp_(max=blocks.shape[1] - 1)  # [N, 1]
    rest = target - torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    inside = x.view(n, -1, block).gather(1, b[..., None].expand(-1, -1, block))[:, 0].cumsum(-1)  # [N, 128]
    j = torch.searchsorted(inside, rest, right=True)
    # rounding can put `rest` at the block's end: take its last entry with mass (where `inside` first peaks)
    j = torch.where(j >= block, inside.argmax(-1, keepdim=True), j)
    return (b * block + j).squeeze(-1)


def _exp_shifted_(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place x <- exp(x / T - rowmax): unnormalised probabilities; masked (-inf) entries become exactly 0."""
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    return x.sub_(x.amax(-1, keepdim=True)).exp_()


def _unnormalised_block_sums(x: torch.Tensor, temperature: float, block: int) -> torch.Tensor:
    """`_exp_shifted_` of x in place; returns its sums over blocks of `block` entries.

    On a CPU the passes (scale, max, exp, block sums) go over ~1 MB of rows at a time, so a row is read from memory
    once and then from cache: over 32 x 151,936 logits that took the sampler from 10.4 to 6.0 ms per token (one
    thread). On CUDA one pass per operation over all rows.
    """
    n, vocab = x.shape
    blocks = x.new_empty((n, vocab // block))
    step = n if x.device.type != "cpu" else max(1, (1 << 18) // vocab)  # 2^18 floats = 1 MB
    for lo in range(0, n, step):
        rows = _exp_shifted_(x[lo : lo + step], temperature)
        torch.sum(rows.view(len(rows), -1, block), -1, out=blocks[lo : lo + step])
    return blocks


def _block_size(vocab: int) -> int | None:
    for block in (128, 256, 64, 512, 32):
        if vocab % block == 0 and vocab >= 4 * block:
            return block
    return None


# weight -> its PackedHead (`PackedHead.of`), by identity (tensors compare elementwise), not keeping the weight alive
_PACKS = WeakIdKeyDictionary()


class PackedHead:
    """The LM head's GEMM for the token loop on a CPU: the fp32 weight packed once in MKL's GEMM layout.

    MKL's `sgemm` re-packs the whole V x H weight into its internal layout on every call; the token loop multiplies
    the same weight every token. `cblas_sgemm_pack` (through torch's `mkl._mkl_linear`) packs it once for a given
    row count. A frozen weight's pack (one per weight: `of`) is kept across rollouts until the weight changes
    (another tensor, new storage, or an in-place update seen by its version counter) or the row count does; a
    trained weight is packed once per rollout (`release` after it: ZeRO-3 and FSDP2 gather it into buffers whose
    writes its version counter may not show). Rows past the live ones are padded with stale inputs (the product is
    bound by reading the weight, so they cost little) and dropped from the result. Measured, one thread,
    V = 151,936: 18.6 -> 13.8 ms per token at H = 128 and 32 rows, 265 -> 176 ms at H = 2048 and 16 rows. The pack
    holds V x (H + ~140 padding) floats while kept (1.07x the weight at H = 2048, 5x at H = 128). `available()` is
    False (the loop then multiplies as before) without MKL, or for a head that is not a plain, bias-free fp32 Linear.
    """

    def __init__(self) -> None:
        # the packed tensor, and what it was made from: the weight (a weak reference: a dead one never matches a new
        # tensor, and the pack does not keep it alive), its version counter, its storage and the row count
        self._packed: torch.Tensor | None = None
        self._made_from: tuple | None = None
        self._input: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedHead:
        """The one `PackedHead` of `weight` in this process, shared by every captioner over it (the UAE's and the
        trainer's policy): one pack held per weight, not one per captioner."""
        pack = _PACKS.get(weight)
        if pack is None:
            pack = _PACKS[weight] = cls()
        return pack

    @staticmethod
    def available(head) -> bool:
        weight = getattr(head, "weight", None)
        return (
            type(head) is torch.nn.Linear
            and head.bias is None
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear")
        )

    def __call__(self, weight: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x [n <= rows, H] -> x @ weight.T [n, V], through a pack made for `rows` rows."""
        made = (weakref.ref(weight), weight._version, weight.data_ptr(), rows)
        old = self._made_from
        if old is None or old[0]() is not weight or old[1:] != made[1:]:
            self.release()  # drop the old pack before making the new one
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            self._input = x.new_zeros((rows, weight.shape[1]))
            self._made_from = made
        n = x.shape[0]
        self._input[:n].copy_(x)
        return torch.ops.mkl._mkl_linear(self._input, self._packed, weight.detach(), None, rows)[:n]

    @property
    def held(self) -> bool:
        """Whether a pack is kept (for the next rollout)."""
        return self._packed is not None

    def release(self) -> None:
        self._packed = self._made_from = self._input = None


class CudaGraphStep:
    """`decode_step` captured in a CUDA graph once per live-row count, then replayed (CUDA only).

    Inputs are copied into static buffers; the returned hidden states [n, H] are the graph's output buffer, valid
    until the next call. A failed capture warns once and falls back to the eager step.
    """

    def __init__(self, language_model, cache: PrefixSharedKVCache, hidden_size: int, dtype, device):
        self.language_model, self.cache = language_model, cache
        self.embeds = torch.zeros((cache.rows, hidden_size), dtype=dtype, device=device)
        self.positions = torch.zeros(cache.rows, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.graphs: dict[int, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False

    def _eager(self, n: int):
        return decode_step(self.language_model, self.cache, self.embeds[:n], self.positions[:n], self.step, None)

    def _capture(self, n: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (it writes the same k/v the replay will)
            self._eager(n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._eager(n)
        return graph, out

    def __call__(self, embeds, positions, step: int):
        n = embeds.shape[0]
        self.embeds[:n].copy_(embeds)
        self.positions[:n].copy_(positions)
        self.step.fill_(step)
        if self.failed:
            return self._eager(n)
        if n not in self.graphs:
            try:
                self.graphs[n] = self._capture(n)
            except RuntimeError as err:  # e.g. an op that syncs with the host inside a custom adapter
                warnings.warn(f"CUDA graph capture of the decode step failed, running it eagerly: {err}", stacklevel=2)
                self.failed = True
                return self._eager(n)
        graph, out = self.graphs[n]
        graph.replay()
        return out


@torch.no_grad()
def sample_tokens(
    captioner,
    cache: PrefixSharedKVCache,
    last: torch.Tensor,
    next_pos: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator,
    sync_every: int = 8,
    cuda_graphs: bool = True,
    share: tuple[int, torch.Tensor] | None = None,
):
    """Sample up to T tokens for the N = B·G rows of `cache` (row b*G + g: completion g of image b).

    Args:
        captioner: the `Captioner` (model, LM head, end/pad ids, banned-token mask).
        last: [B, H] hidden state of each prompt's last position; next_pos: [B] rope position after each prompt.
        share: (M, index [N]): these rows are rows `index` of a batch of M (one rank's part of a distributed
            batch); each token's uniform numbers are drawn for all M rows and these take theirs, so the ranks
            sample what one process sampling the whole batch would.

    Returns:
        tokens [N, T'] (T' = longest completion; pad after the end token), lengths [N], truncated [N] bool.
    """
    n = rows = cache.rows
    g = cache.generations
    device = last.device
    lm, head = captioner.vl.language_model, captioner.encoder.lm_head
    embed = captioner.vl.get_input_embeddings()
    tokens = torch.full((rows, max_new_tokens), captioner.pad_id, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    eos = torch.tensor(captioner.eos_ids, device=device)
    banned = captioner.banned.nonzero()[:, 0].to(device)
    hidden = last.repeat_interleave(g, 0)  # [N, H]
    positions = next_pos.repeat_interleave(g, 0)
    graphed = device.type == "cuda" and cuda_graphs
    step = CudaGraphStep(lm, cache, hidden.shape[1], hidden.dtype, device) if graphed else None
    # 1/T folded into the head's input (n x H) instead of a pass over the n x V logits
    fold = temperature > 0 and getattr(head, "bias", None) is None
    packed = PackedHead.of(head.weight) if PackedHead.available(head) else None
    for t in range(max_new_tokens):
        x = hidden * (1.0 / temperature) if fold else hidden
        if packed is not None and x.dtype == torch.float32:
            logits = packed(head.weight, x, rows)  # [n, V]
        else:
            logits = head(x).float()
        logits.index_fill_(1, banned, float("-inf"))
        uniform = None
        if temperature > 0:
            if share is None:
                uniform = torch.rand((rows, 1), generator=generator, device=device)
            else:
                uniform = torch.rand((share[0], 1), generator=generator, device=device)[share[1]]
            uniform = uniform if n == rows else uniform[cache.slot[:n]]
        warm = 1.0 if fold else temperature
        token = sample_token(logits, warm, top_p, generator, uniform=uniform, inplace=True)
        token = torch.where(finished, captioner.pad_id, token)
        slot = cache.slot[:n]
        tokens[slot, t] = token
        ended = ~finished & torch.isin(token, eos)
        lengths[slot] = torch.where(ended, t + 1, lengths[slot])
        finished |= ended
        if t + 1 == max_new_tokens:
            break
        if (t + 1) % sync_every == 0:  # the only host sync inside the loop
            live = int((~finished).sum())
            if live == 0:
                break
            target = live if not graphed else min(n, 1 << (live - 1).bit_length())
            if target < n:
                keep = torch.argsort(finished.to(torch.int8), stable=True)[:target]  # live rows first, in order
                cache.keep(keep)
                token, positions, finished, n = token[keep], positions[keep], finished[keep], target
        embeds = embed(token)
        if step is not None:
            hidden = step(embeds, positions + t, t)
        else:
            hidden = decode_step(lm, cache, embeds, positions + t, t, t + 1)
    if packed is not None and head.weight.requires_grad:
        packed.release()  # a trained head is packed again next rollout (see PackedHead)
    truncated = ~torch.isin(tokens, eos).any(1)  # a completion that ended holds its end token
    return tokens[:, : int(lengths.max())], lengths, truncated
