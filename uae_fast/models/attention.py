"""SD3 joint attention that honours a text padding mask.

diffusers' `JointAttnProcessor2_0` lets every image and text token attend to every text token, so a caption padded
to the length of a longer neighbour in the batch would be decoded differently than on its own. This processor takes
`attention_mask` [B, L_text] (True = real token) and hides padded text *keys*; padded text queries still attend to
real keys (never an all-masked row, so no NaN) and their outputs only ever feed other padded positions. With it, a
caption's image does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MaskedJointAttnProcessor", "use_masked_joint_attention"]


class MaskedJointAttnProcessor:
    """Drop-in replacement for diffusers' `JointAttnProcessor2_0` with an optional text key mask."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        batch, num_image_tokens = hidden_states.shape[:2]
        query, key, value = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)

        sdpa_mask = None
        if encoder_hidden_states is not None:
            ctx_q, ctx_k, ctx_v = _heads(
                attn,
                encoder_hidden_states,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                attn.norm_added_q,
                attn.norm_added_k,
            )
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)
            # An all-True mask would only cost SDPA its fused fast path.
            if attention_mask is not None and not bool(attention_mask.all()):
                image_keys = attention_mask.new_ones(batch, num_image_tokens)
                sdpa_mask = torch.cat([image_keys, attention_mask], dim=1).bool()[:, None, None, :]

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=sdpa_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)

        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image_out, context_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out


def _heads(attn, states, to_q, to_k, to_v, norm_q, norm_k):
    """Project to q, k, v as [B, heads, T, head_dim], with the optional per-head q/k norms of SD3.5."""
    batch = states.shape[0]
    q, k, v = to_q(states), to_k(states), to_v(states)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def use_masked_joint_attention(transformer) -> None:
    """Install :class:`MaskedJointAttnProcessor` on every attention layer of an SD3 transformer."""
    transformer.set_attn_processor(MaskedJointAttnProcessor())
