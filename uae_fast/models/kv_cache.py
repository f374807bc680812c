"""A static KV cache for B·G decoding rows after B shared prompt prefixes, and the decode step that uses it.

Layout (per layer): the prefill's keys/values of the B prompts, **not repeated** ([B, KVH, P, D]: the image prefix of
a group is stored and read once for its G rows), plus a pre-allocated [N, KVH, T, D] block for the tokens the rows
sample (N = B·G rows, T = max new tokens). Attention of a new token is a cascade: one batched product per image
against its prefix (the G rows' queries of an image form one matrix, so the prefix keys are read once per image, not
G times), one per row against its own new tokens, merged exactly through their log-sum-exps. Rows that finish are
dropped by moving the live rows to the front of the same buffers (`keep`); nothing is re-allocated.

The step is a plain loop over the Qwen2.5-VL text layers (their norms, projections — LoRA-wrapped or not — and MLPs
are called as modules), with text-only rotary positions (the three mrope sections agree after the prompt). It runs
with the step index either as a Python int (CPU: attention over the filled slots only) or as a device tensor with
all T slots masked by position (fixed shapes, so a CUDA graph can replay it).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["PrefixSharedKVCache", "cascade_attention", "decode_step"]


class PrefixSharedKVCache:
    """Prefix keys/values shared by the G rows of each image + pre-allocated per-row keys/values of new tokens.

    Args:
        prefix: per layer (keys, values), each [B, KVH, P, D] (the prefill's cache; kept, not copied).
        prompt_mask: [B, P] 1 for real prompt positions (prompts are right-padded).
        num_generations: G rows per image; row r (of N = B·G) belongs to image r // G.
        max_new_tokens: T, the slots per row.
    """

    def __init__(
        self, prefix: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask, num_generations: int, max_new_tokens: int
    ):
        k0 = prefix[0][0]
        self.batch, self.kv_heads, _, self.head_dim = k0.shape
        self.generations = num_generations
        self.rows = self.batch * num_generations
        self.prefix = prefix
        # additive bias over the prefix, shaped for [B, KVH, G*groups, P] scores
        bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=k0.device)
        self.prefix_bias = bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
        shape = (self.rows, self.kv_heads, max_new_tokens, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix]
        self.values = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix]
        self.slot = torch.arange(self.rows, device=k0.device)  # [n] original row (b*G + g) of each live row
        self.live = self.rows

    @classmethod
    def from_prefill(cls, cache, prompt_mask, num_generations: int, max_new_tokens: int) -> PrefixSharedKVCache:
        """From a transformers `DynamicCache` of B right-padded prompts (its tensors are used as they are)."""
        layers = getattr(cache, "layers", None)
        if not layers or getattr(layers[0], "keys", None) is None:
            raise ConfigError("the prefill's cache must be a transformers DynamicCache with per-layer keys/values")
        return cls([(layer.keys, layer.values) for layer in layers], prompt_mask, num_generations, max_new_tokens)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep live rows `rows` ([n'] indices into the n live rows, increasing), moved to the buffers' front."""
        n = len(rows)
        for buf in (*self.keys, *self.values):
            buf[:n] = buf[: self.live][rows]  # the gather copies first, so the overlapping write is safe
        self.slot[:n] = self.slot[: self.live][rows]  # in place: a captured CUDA graph reads this buffer
        self.live = n

    def attend(self, layer: int, q, k, v, step, length: int | None):
        """Write this step's k, v into slot `step` of the live rows, attend, return [n, H*D].

        Args:
            q: [n, H, D] rotated queries; k, v: [n, KVH, D] (k rotated).
            step: slot index (int, or a 0-d long tensor on the device for graph replay).
            length: slots to attend to (step + 1); None attends to all T, masking slots past `step` (fixed shapes).
        """
        n = q.shape[0]
        keys, values = self.keys[layer][:n], self.values[layer][:n]
        if isinstance(step, int):
            keys[:, :, step], values[:, :, step] = k, v
        else:
            keys.index_copy_(2, step.view(1), k[:, :, None])
            values.index_copy_(2, step.view(1), v[:, :, None])
        bias = None
        if length is None:
            slots = torch.arange(keys.shape[2], device=q.device)
            bias = torch.zeros(slots.shape, dtype=torch.float32, device=q.device).masked_fill(
                slots > step, float("-inf")
            )
        else:
            keys, values = keys[:, :, :length], values[:, :, :length]
        pk, pv = self.prefix[layer]
        out = cascade_attention(q, pk, pv, self.prefix_bias, keys, values, bias, self.slot[:n], self.generations)
        return out.reshape(n, -1)


def cascade_attention(q, prefix_k, prefix_v, prefix_bias, keys, values, bias, slot, generations: int):
    """Softmax attention of one query per row over [its image's prefix ; its own new tokens], exactly.

    Args:
        q: [n, H, D] (scaled inside by D^-1/2); prefix_k/v: [B, KVH, P, D]; prefix_bias: [B, 1, 1, P] (0 / -inf);
        keys/values: [n, KVH, L, D]; bias: [L] additive or None; slot: [n] original row b*G + g of each row.

    Returns:
        [n, H, D] in q's dtype. Query head h uses KV head h // (H / KVH), as transformers' `repeat_kv`.
    """
    n, heads, dim = q.shape
    batch, kv_heads = prefix_k.shape[:2]
    groups = heads // kv_heads
    scale = dim**-0.5
    # Prefix part, per image: the queries of its G rows (live or not: cheap, and shapes stay fixed) as one matrix.
    grid = q.new_zeros((batch * generations, heads, dim)) if n < batch * generations else q
    if n < batch * generations:
        grid = grid.index_copy(0, slot, q)
    grid = grid.view(batch, generations, kv_heads, groups, dim).transpose(1, 2).reshape(batch, kv_heads, -1, dim)
    s = torch.matmul(grid, prefix_k.transpose(-1, -2)).float() * scale + prefix_bias  # [B, KVH, G*groups, P]
    m_p = s.amax(-1, keepdim=True)
    e = torch.exp(s - m_p)
    l_p = e.sum(-1, keepdim=True)
    o_p = torch.matmul(e.to(prefix_v.dtype), prefix_v).float()  # [B, KVH, G*groups, D], unnormalised

    def rows(x):  # [B, KVH, G*groups, X] -> [n, KVH, groups, X] of the live rows
        x = (
            x.view(batch, kv_heads, generations, groups, -1)
            .transpose(1, 2)
            .reshape(batch * generations, kv_heads, groups, -1)
        )
        return x if n == batch * generations else x[slot]

    m_p, l_p, o_p = rows(m_p), rows(l_p), rows(o_p)
    # New-token part, per row.
    qr = q.view(n, kv_heads, groups, dim)
    s = torch.matmul(qr, keys.transpose(-1, -2)).float() * scale  # [n, KVH, groups, L]
    if bias is not None:
        s = s + bias
    m_n = s.amax(-1, keepdim=True)
    e = torch.exp(s - m_n)
    l_n = e.sum(-1, keepdim=True)
    o_n = torch.matmul(e.to(values.dtype), values).float()
    m = torch.maximum(m_p, m_n)
    a_p, a_n = torch.exp(m_p - m), torch.exp(m_n - m)
    out = (o_p * a_p + o_n * a_n) / (l_p * a_p + l_n * a_n)
    return out.reshape(n, heads, dim).to(q.dtype)


def check_decoder(language_model) -> None:
    """Fail early, with a clear message, on a text model this step does not implement."""
    config = language_model.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(config, "use_sliding_window", False):
        raise ConfigError(f"the static-cache decoder supports full attention only, got layer types {sorted(types)}")
    layer = language_model.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if not hasattr(layer, name):
            raise ConfigError(f"the static-cache decoder needs Qwen2-style decoder layers (no `{name}`)")


def _rope(x, cos, sin):  # x [n, heads, D]; cos/sin [n, 1, D] (transformers' rotate_half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_step(language_model, cache: PrefixSharedKVCache, embeds, positions, step, length: int | None):
    """One token per live row through the text layers: [n, H] input embeddings -> [n, H] final hidden states.

    Args:
        positions: [n] rope positions of the fed tokens; step / length: as `PrefixSharedKVCache.attend`.
    """
    rotary = language_model.rotary_emb
    freqs = positions[:, None].float() * rotary.inv_freq.to(positions.device, torch.float32)[None]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [n, 1, D]
    cos = (emb.cos() * rotary.attention_scaling).to(embeds.dtype)
    sin = (emb.sin() * rotary.attention_scaling).to(embeds.dtype)
    n = embeds.shape[0]
    hidden = embeds
    for index, layer in enumerate(language_model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = _rope(attn.q_proj(x).view(n, -1, cache.head_dim), cos, sin)
        k = _rope(attn.k_proj(x).view(n, -1, cache.head_dim), cos, sin)
        v = attn.v_proj(x).view(n, -1, cache.head_dim)
        hidden = hidden + attn.o_proj(cache.attend(index, q, k, v, step, length))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return language_model.norm(hidden)
