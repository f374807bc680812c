"""A static KV cache for B·G decoding rows after B shared prompt prefixes, and the decode step that uses it.

Layout (per layer, per image): one [KVH, P + T·G, D] block — the image's prompt prefix once (copied in from the
prefill, **not** repeated for its G rows), then T·G slots for the tokens its G rows sample, slot-major (token t of
row g at P + t·G + g). One decode step attends with a single SDPA call per layer over [B, H, G, D] queries (the G rows
of an image are its query positions, so the prefix keys are read once per image, not G times), each query masked to
its prompt and its own row's tokens; on a CPU the keys are sliced to the P + (t+1)·G filled positions. Rows that
finish are dropped from everything computed per row (projections, MLPs, LM head, sampling): they stay at their grid
positions, so nothing moves and nothing is re-allocated; only their (cheap) attention queries remain, as zeros.

The step is a plain loop over the Qwen2.5-VL text layers (their projections — LoRA-wrapped or not — and MLPs are
called as modules; fp32 RMSNorms go through `F.rms_norm`), with text-only rotary positions (the three mrope sections
agree after the prompt). The step index is a Python int (CPU: attention over the filled slots) or a 0-d device tensor
with every slot masked by position (fixed shapes, so a CUDA graph can replay it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["PrefixSharedKVCache", "check_decoder", "decode_step"]


class PrefixSharedKVCache:
    """Prefix keys/values stored once per image + pre-allocated slots for the new tokens of its G rows.

    Args:
        prefix: per layer (keys, values), each [B, KVH, P, D] (the prefill's cache).
        prompt_mask: [B, P] 1 for real prompt positions (prompts are right-padded).
        num_generations: G rows per image; row r (of N = B·G) belongs to image r // G.
        max_new_tokens: T, the slots per row.
    """

    def __init__(
        self, prefix: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask, num_generations: int, max_new_tokens: int
    ):
        k0 = prefix[0][0]
        batch, self.kv_heads, self.prompt_len, self.head_dim = k0.shape
        g, device = num_generations, k0.device
        self.batch, self.generations, self.rows = batch, g, batch * g
        width = self.prompt_len + max_new_tokens * g
        self.keys, self.values = [], []
        for pk, pv in prefix:
            for store, part in ((self.keys, pk), (self.values, pv)):
                buf = part.new_zeros((batch, self.kv_heads, width, self.head_dim))
                buf[:, :, : self.prompt_len] = part
                store.append(buf)
        # [B, 1, G, width]: query g sees its prompt's real positions and the slots of its own row
        own = torch.eye(g, dtype=torch.bool, device=device).repeat(1, max_new_tokens)  # [G, T·G]
        self.mask = torch.cat(
            [prompt_mask.bool()[:, None, None, :].expand(-1, 1, g, -1), own.expand(batch, 1, g, -1)], dim=-1
        ).contiguous()
        self.positions = torch.arange(width, device=device)
        # per live row (static buffers, updated in place: a captured CUDA graph reads them)
        self.slot = torch.arange(self.rows, device=device)  # [n] original row b*G + g
        self.image = self.slot // g  # [n] b
        self.first = self.prompt_len + self.slot % g  # [n] position of the row's token 0
        self.live = self.rows

    @classmethod
    def from_prefill(cls, cache, prompt_mask, num_generations: int, max_new_tokens: int) -> PrefixSharedKVCache:
        """From a transformers `DynamicCache` of B right-padded prompts."""
        layers = getattr(cache, "layers", None)
        if not layers or getattr(layers[0], "keys", None) is None:
            raise ConfigError("the prefill's cache must be a transformers DynamicCache with per-layer keys/values")
        return cls([(layer.keys, layer.values) for layer in layers], prompt_mask, num_generations, max_new_tokens)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep live rows `rows` ([n'] indices into the n live rows); their keys and values stay where they are."""
        n = len(rows)
        for buf in (self.slot, self.image, self.first):
            buf[:n] = buf[: self.live][rows]
        self.live = n

    def attend(self, layer: int, q, k, v, step, length: int | None):
        """Write this step's k, v into slot `step` of the live rows, attend, return [n, H*D].

        Args:
            q: [n, H, D] rotated queries; k, v: [n, KVH, D] (k rotated).
            step: token index (int, or a 0-d long tensor on the device for graph replay).
            length: tokens to attend to (step + 1); None attends to all slots, masking those past `step`.
        """
        n, heads, dim = q.shape
        image, where = self.image[:n], self.first[:n] + step * self.generations
        keys, values = self.keys[layer], self.values[layer]
        keys[image, :, where] = k
        values[image, :, where] = v
        if length is None:
            mask = self.mask & (self.positions < self.prompt_len + (step + 1) * self.generations)
        else:
            width = self.prompt_len + length * self.generations
            keys, values, mask = keys[:, :, :width], values[:, :, :width], self.mask[..., :width]
        grid = q if n == self.rows else q.new_zeros((self.rows, heads, dim)).index_copy_(0, self.slot[:n], q)
        grid = grid.view(self.batch, self.generations, heads, dim).transpose(1, 2)  # [B, H, G, D]
        out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, enable_gqa=heads != self.kv_heads)
        out = out.transpose(1, 2).reshape(self.rows, heads * dim)
        return out if n == self.rows else out[self.slot[:n]]


def check_decoder(language_model) -> None:
    """Fail early, with a clear message, on a text model this step does not implement."""
    config = language_model.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(config, "use_sliding_window", False):
        raise ConfigError(f"the static-cache decoder supports full attention only, got layer types {sorted(types)}")
    rope = getattr(language_model.rotary_emb, "rope_type", "default")
    if rope != "default":  # dynamic/yarn-style updates of inv_freq are not replayed by the step's own rope
        raise ConfigError(f"the static-cache decoder supports rope_type 'default' (Qwen2.5-VL's), got {rope!r}")
    layer = language_model.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if not hasattr(layer, name):
            raise ConfigError(f"the static-cache decoder needs Qwen2-style decoder layers (no `{name}`)")


def _rope(x, cos, signed_sin):  # x [n, heads, D]; cos [n, 1, D]; signed_sin = [-sin, sin] halves
    # transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1, 1]
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


def _norm(module, x):
    """A Qwen RMSNorm; fp32 inputs through the fused `F.rms_norm` (equal to transformers' in fp32)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if x.dtype != torch.float32 or weight is None or eps is None or weight.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, weight.shape, weight, eps)


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
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    n = embeds.shape[0]
    hidden = embeds
    for index, layer in enumerate(language_model.layers):
        attn = layer.self_attn
        x = _norm(layer.input_layernorm, hidden)
        q = _rope(attn.q_proj(x).view(n, -1, cache.head_dim), cos, sin)
        k = _rope(attn.k_proj(x).view(n, -1, cache.head_dim), cos, sin)
        v = attn.v_proj(x).view(n, -1, cache.head_dim)
        hidden = hidden + attn.o_proj(cache.attend(index, q, k, v, step, length))
        hidden = hidden + layer.mlp(_norm(layer.post_attention_layernorm, hidden))
    return _norm(language_model.norm, hidden)
