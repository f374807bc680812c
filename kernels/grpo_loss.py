"""GRPO policy loss fused with the LM head: loss and gradients without ever materialising [N, V] logits.

Tokens are packed: `hidden` [N, H] holds the completion tokens of S sequences, `seq_index` [N] says which sequence
each token belongs to. The loss is TRL's (same clipping, k3 KL, importance-sampling levels and `loss_type`
normalisations), written once in `per_token_loss` and used by every path:

- frozen LM head (LoRA, our default): `linear_logprobs` gives log-probs whose backward is a gather and a subtraction,
  the loss on top is plain autograd over [N]-vectors. Two GEMMs per chunk — the bare minimum — for any setting.
- trainable LM head: a single pass per chunk computes log-probs, the loss gradient of each token (autograd over the
  chunk's [c]-vector), and both input gradients, accumulating the [V, H] weight gradient in place: three GEMMs, no
  recompute. Needs each token's loss gradient inside its chunk, i.e. token-level importance sampling or on-policy
  (`old_logp=None`) sequence-level; otherwise the logits are recomputed once in the backward.

Masked tokens are dropped before any GEMM. Every loss type reduces to a weighted sum Σ_t w_t ℓ_t with per-token
weights known up front (`token_weights`), which is what lets the loss be computed chunk by chunk.
"""

from __future__ import annotations

import torch

from ..rl.config import IS_LEVELS, LOSS_TYPES
from .linear_logprobs import (
    DEFAULT_CHUNK,
    accumulate_head_grad,
    block_logits,
    check_token_ids,
    entropy_from_rest,
    linear_logprobs,
    rest_mass,
)

__all__ = [
    "LOSS_TYPES",
    "IS_LEVELS",
    "token_weights",
    "per_token_loss",
    "grpo_metrics",
    "fused_linear_grpo_loss",
    "grpo_loss_ref",
]


def token_weights(
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> torch.Tensor:
    """Per-token weights w [N] with loss = Σ_t w_t ℓ_t, matching TRL's normalisation for each `loss_type`.

    grpo: mean over sequences of the per-sequence token mean; bnpo: mean over all tokens; dr_grpo: sum divided by
    S · max_completion_length; dapo: sum divided by `num_items` (completion tokens in the whole generation batch,
    default: this batch's).
    """
    m = mask.float()
    if loss_type == "grpo":
        lengths = torch.zeros(num_sequences, device=m.device).index_add_(0, seq_index, m).clamp(min=1.0)
        return m / lengths[seq_index] / max(num_sequences, 1)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return m / (max(num_sequences, 1) * max_completion_length)
    if loss_type == "dapo":
        denom = m.sum() if num_items is None else torch.as_tensor(float(num_items), device=m.device)
        return m / denom.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    seq_lengths: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """TRL's clipped surrogate plus k3 KL, per token. All inputs [n] except seq_lengths [S] (clamped ≥ 1).

    `entropy_coef` > 0 adds an entropy bonus as a per-token reward: each token's advantage becomes
    A − c·(log p(y) + H), H [n] = `entropy`, the entropy of the token's distribution (not differentiated). Since
    E_y[log p(y)] = −H, the added term has mean zero at every position, and its expected gradient is c·∇H — the
    gradient of the entropy at that position (REINFORCE with H as the baseline) — read off the sampled token alone,
    so it needs no extra pass over the logits in any path.

    Returns (loss [n], importance ratio [n], kl [n] or None). Sequence-level ratios need all of a sequence's
    tokens in one call.
    """
    if entropy_coef:
        advantages = advantages - entropy_coef * (logp.detach() + entropy.detach())
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        per_seq = torch.zeros(seq_lengths.shape[0], device=logp.device, dtype=logp.dtype)
        log_w = (per_seq.index_add(0, seq_index, log_ratio * mask) / seq_lengths)[seq_index]
    else:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, ratio, kl


@torch.no_grad()
def grpo_metrics(
    ratio, kl, entropy, advantages, mask, seq_index, num_sequences, epsilon_low, epsilon_high, importance_sampling_level
) -> dict[str, torch.Tensor]:
    """TRL's logged quantities: kl and entropy as masked token means; clip ratios (low/high/region) as masked token
    means, or — with sequence-level ratios — as the mean over all S sequences, as TRL does."""
    m = mask.float()
    num_sequences = max(num_sequences, 1)

    def token_mean(x):
        return (x.float() * m).sum() / m.sum().clamp(min=1.0)

    def sequence_mean(x):  # all tokens of a sequence share its ratio; sequences without tokens count as 0
        flags = torch.zeros(num_sequences, device=x.device)
        return flags.scatter_reduce_(0, seq_index, x.float() * m, "amax").sum() / num_sequences

    clip_mean = sequence_mean if importance_sampling_level == "sequence" else token_mean
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    out = {
        "clip_ratio/low_mean": clip_mean(low),
        "clip_ratio/high_mean": clip_mean(high),
        "clip_ratio/region_mean": clip_mean(low | high),
    }
    if kl is not None:
        out["kl"] = token_mean(kl)
    if entropy is not None:
        out["entropy"] = token_mean(entropy)
    return out


class _TrainableHeadGRPO(torch.autograd.Function):
    """Single pass per chunk for a trainable LM head: loss value, d/dhidden and d/dweight in the forward.

    Per chunk: three GEMMs (z = hs Wᵀ, e W, eᵀ (g/s·hs)) and four passes over the [c, V] buffer (max, subtract,
    exp, sum), reusing one buffer for every chunk. The loss gradient's per-token scale g/s is applied to the small
    [c, H] operand of the weight-gradient GEMM instead of the [c, V] probabilities, the one-hot part is a row
    scatter, and the entropy comes from E_p[W], which the input gradient needs anyway (`entropy_from_rest`). The
    target's probability is taken out of both GEMMs and added back in fp32 as the one-hot coefficient g (1 - p_y):
    no cancellation against a bf16 GEMM on confident tokens (see `linear_logprobs`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, y, extras, cfg):
        old, ref, adv, mask, seq_index, seq_lengths, weights = extras
        inv_temp, chunk, entropy = cfg["inv_temp"], cfg["chunk"], cfg["entropy"]
        n, vocab = hidden.shape[0], weight.shape[0]
        fp32 = weight.dtype == torch.float32
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32)
        grad_w = torch.empty(weight.shape, device=weight.device, dtype=torch.float32)  # the first chunk overwrites it
        logp_all = torch.empty(n, device=hidden.device, dtype=torch.float32)
        ent_all = torch.empty_like(logp_all) if entropy else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        # The only vocabulary-sized buffer, allocated once: a fresh [c, V] tensor per chunk costs page faults.
        zbuf = torch.empty(min(chunk, n) * vocab, device=hidden.device, dtype=torch.float32)
        for a in range(0, n, chunk):
            sl = slice(a, min(a + chunk, n))
            ys = y[sl]
            hs = hidden[sl].float() * inv_temp
            z = block_logits(hs, weight, zbuf)  # low-precision head: GEMMs in its dtype, softmax in fp32
            chosen = z.gather(1, ys[:, None]).squeeze(1)
            m = z.amax(1)
            s = z.sub_(m[:, None]).exp_().sum(1)  # z := e = exp(z - max), p = e / s
            lse = m + torch.log(s)
            q = rest_mass(chosen, m, s)  # 1 - p_y
            z.scatter_(1, ys[:, None], 0.0)  # e without the target: its term is q, added below in fp32
            logp = (chosen - lse).requires_grad_(True)
            # Σ_{v≠y} p_v W_v as (Wᵀ eᵀ)ᵀ / s: ~20% faster than e W with MKL (see block_logits)
            pw_t = torch.mm(weight.t(), z.t()) if fp32 else (weight.t() @ z.t().to(weight.dtype)).float()
            pw = pw_t.div_(s).t()
            ent = entropy_from_rest(logp.detach(), q, lse, hs, pw) if entropy else None
            with torch.enable_grad():
                loss_t, _, _ = per_token_loss(
                    logp, _sl(old, sl), _sl(ref, sl), adv[sl], mask[sl], seq_index[sl], seq_lengths,
                    entropy=ent, **cfg["loss"],
                )  # fmt: skip
                chunk_loss = (weights[sl] * loss_t).sum()
                (g,) = torch.autograd.grad(chunk_loss, logp)
            total += chunk_loss.detach()
            logp_all[sl] = logp.detach()
            if entropy:
                ent_all[sl] = ent
            # d/dh = g (W[y] - E_p[W]) / T = g ((1 - p_y) W[y] - Σ_{v≠y} p_v W_v) / T
            grad_h[sl] = weight[ys].float().mul_(q[:, None]).sub_(pw).mul_((g * inv_temp)[:, None])
            accumulate_head_grad(grad_w, z, g / s, g * q, hs, ys, 0, first=a == 0)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp_all)
        if ent_all is not None:
            ctx.mark_non_differentiable(ent_all)
        return total, logp_all, ent_all

    @staticmethod
    def backward(ctx, grad_loss, _g_logp, _g_ent):
        grad_h, grad_w = ctx.saved_tensors
        if not bool(grad_loss == 1):  # the usual loss.backward() passes 1: hand over the buffers, no [V, H] copy
            grad_h, grad_w = grad_h * grad_loss, grad_w * grad_loss
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


def _sl(x, sl):
    return None if x is None else x[sl]


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    seq_index: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    num_sequences: int | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_block: int | None = None,
    compute_entropy: bool = True,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss over packed completion tokens, fused with the LM head.

    Args:
        hidden: [N, H] hidden states of the completion tokens (the positions that predict them).
        weight: [V, H] LM head; its gradient is computed only if it requires grad.
        token_ids: [N] the sampled tokens, in [0, V) where mask is 1 (else ConfigError).
        seq_index: [N] sequence of each token, in [0, S).
        advantages: [S], one per sequence.
        mask: [N] 1 for tokens that count (default all). old_logp / ref_logp: [N] (old None = on-policy).
        num_sequences: S, counting sequences with no tokens (default seq_index.max() + 1).
        beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level, temperature, max_completion_length,
        num_items: as TRL's GRPOConfig / GRPOTrainer (epsilon_high defaults to epsilon_low).
        chunk_size, vocab_block: memory/speed trade-off, see `linear_logprobs`.
        entropy_coef: the entropy bonus's weight c (see `per_token_loss`); > 0 computes the entropy.

    Returns:
        (loss scalar, logp [N] detached, metrics) — metrics: kl (if beta), clip ratios, entropy (if computed).
    """
    n = hidden.shape[0]
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    for name, x in (("token_ids", token_ids), ("seq_index", seq_index), ("mask", mask), ("old_logp", old_logp),
                    ("ref_logp", ref_logp)):  # fmt: skip
        if x is not None and x.shape != (n,):
            raise ValueError(f"{name} must be [N] = [{n}], got {tuple(x.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
    compute_entropy = compute_entropy or entropy_coef > 0
    seq_index = seq_index.long()
    num_sequences = int(seq_index.max()) + 1 if num_sequences is None and n else (num_sequences or 0)
    mask = torch.ones(n, device=hidden.device) if mask is None else mask.float()
    if advantages.shape != (num_sequences,):
        raise ValueError(
            f"advantages must be [S] = [{num_sequences}] (one per sequence), got {tuple(advantages.shape)}"
        )
    if n and int(seq_index.max()) >= num_sequences:
        raise ValueError(f"seq_index has values >= num_sequences ({num_sequences})")
    adv = advantages.float()[seq_index]
    seq_lengths = torch.zeros(max(num_sequences, 1), device=hidden.device).index_add_(0, seq_index, mask).clamp(min=1)
    weights = token_weights(mask, seq_index, num_sequences, loss_type, max_completion_length, num_items)

    # Masked tokens contribute nothing: drop them before any GEMM (autograd scatters their zero gradient back).
    keep = mask.nonzero().squeeze(1) if not bool(mask.all()) else None
    pick = (lambda x: x) if keep is None else (lambda x: None if x is None else x[keep])
    h, y = pick(hidden), pick(token_ids).long()
    check_token_ids(y, weight.shape[0], keep)  # masked tokens are never looked up: any id is fine there
    old, ref, a, m, si, w = pick(old_logp), pick(ref_logp), pick(adv), pick(mask), pick(seq_index), pick(weights)
    loss_cfg = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                    importance_sampling_level=importance_sampling_level, entropy_coef=entropy_coef)  # fmt: skip

    single_pass = (
        weight.requires_grad and vocab_block is None and (importance_sampling_level == "token" or old_logp is None)
    )
    if single_pass and h.shape[0]:
        # On-policy, sequence-level and token-level ratios are both exactly 1 and, because every loss type weighs
        # the tokens of a sequence equally, have the same gradient (-A_s w_t); the token form needs no other chunk.
        chunk_cfg = {**loss_cfg, "importance_sampling_level": "token"} if old_logp is None else loss_cfg
        cfg = {"inv_temp": 1.0 / temperature, "chunk": chunk_size, "entropy": compute_entropy, "loss": chunk_cfg}
        loss, logp, ent = _TrainableHeadGRPO.apply(h, weight, y, (old, ref, a, m, si, seq_lengths, w), cfg)
    else:
        logp, ent = linear_logprobs(
            h, weight, y, temperature=temperature, chunk_size=chunk_size, vocab_block=vocab_block,
            entropy=compute_entropy,
        )  # fmt: skip
        loss_t, ratio, kl = per_token_loss(logp, old, ref, a, m, si, seq_lengths, entropy=ent, **loss_cfg)
        loss = (w * loss_t).sum()
    if single_pass and h.shape[0]:  # the single pass built its ratios chunk by chunk: rebuild them for the metrics
        with torch.no_grad():
            _, ratio, kl = per_token_loss(logp, old, ref, a, m, si, seq_lengths, entropy=ent, **loss_cfg)
    metrics = grpo_metrics(
        ratio, kl, ent, a, m, si, num_sequences, epsilon_low, epsilon_high, importance_sampling_level
    )
    full_logp = (
        logp.detach() if keep is None else torch.zeros(n, device=hidden.device).index_copy_(0, keep, logp.detach())
    )
    return loss, full_logp, metrics


def grpo_loss_ref(
    hidden, weight, token_ids, seq_index, advantages, *, mask=None, old_logp=None, ref_logp=None,
    num_sequences=None, beta=0.0, epsilon_low=0.2, epsilon_high=None, loss_type="dapo",
    importance_sampling_level="token", temperature=1.0, max_completion_length=None, num_items=None,
):  # fmt: skip
    """fp32 reference: full [N, V] logits, log-softmax, gather, then the same loss (the test oracle)."""
    n = hidden.shape[0]
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    seq_index = seq_index.long()
    num_sequences = int(seq_index.max()) + 1 if num_sequences is None else num_sequences
    mask = torch.ones(n) if mask is None else mask.float()
    adv = advantages.float()[seq_index]
    logits = hidden.float() @ weight.float().t() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(1, token_ids.long()[:, None]).squeeze(1)
    seq_lengths = torch.zeros(max(num_sequences, 1)).index_add_(0, seq_index, mask).clamp(min=1)
    loss_t, _, _ = per_token_loss(
        logp, old_logp, ref_logp, adv, mask, seq_index, seq_lengths, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, importance_sampling_level=importance_sampling_level,
    )  # fmt: skip
    weights = token_weights(mask, seq_index, num_sequences, loss_type, max_completion_length, num_items)
    return (weights * loss_t).sum(), logp.detach()
