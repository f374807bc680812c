"""The captioner as a trainable policy: LoRA on the language model and the hidden states the fused GRPO loss
consumes, on top of the one captioner (`uae_fast.models.captioner.Captioner`) that also serves inference.

Sampling, image encoding (C++ preprocessing, one vision-tower pass per image) and decoding are inherited: a
rollout is exactly what `UAE.caption` would sample. The update never computes logits: `completion_hidden` returns
hidden states of the completion tokens for `uae_fast.rl.grpo_loss`, fused with the LM head, and forwards each
image's prompt once for all of its completions.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.captioner import Captioner, Completions, ImageBatch
from ..models.encoder import CAPTION_PROMPT
from .config import LoraSettings

__all__ = ["ImageBatch", "Completions", "CaptionPolicy"]


class CaptionPolicy(Captioner):
    """UAEEncoder + processor as a trainable policy (a :class:`Captioner` with LoRA and a packed forward).

    Args:
        encoder: the `UAEEncoder` (its weights are frozen here; only LoRA and, optionally, embeddings train).
        processor: its `Qwen2_5_VLProcessor` (tokenizer, chat template, image sizes).
        lora: adapter settings; None leaves the encoder as it is (evaluation).
        prompt: the caption instruction (the official one by default).
    """

    def __init__(self, encoder, processor, lora: LoraSettings | None, *, prompt: str = CAPTION_PROMPT):
        super().__init__(encoder, processor, prompt=prompt)
        if lora is not None:
            self._add_lora(lora)

    # ------------------------------------------------------------------ setup
    def _add_lora(self, settings: LoraSettings) -> None:
        from peft import LoraConfig

        self.encoder.requires_grad_(False)
        if self.encoder.lora_model is not None:
            # A checkpoint with llm_lora/ (the release, or one of our runs): keep training that adapter, with its
            # own rank and targets. The reference (adapters off) is then the base model under it.
            for name, param in self.encoder.lora_model.named_parameters():
                param.requires_grad_("lora_" in name or ".modules_to_save." in name)
            return
        language_model = self.vl.language_model
        targets = [
            f"language_model.{name}" for name, m in language_model.named_modules() if isinstance(m, torch.nn.Linear)
        ]
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            modules_to_save=["embed_tokens"] if settings.train_embeddings else None,
        )
        self.encoder.attach_lora(config)

    @property
    def peft_model(self):
        """The PEFT-wrapped inner model holding the adapters, or None without adapters."""
        return self.encoder.lora_model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def adapters_disabled(self):
        """Context in which the policy is the base model: the reference policy, for free."""
        peft = self.peft_model
        return peft.disable_adapter() if peft is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ forward
    def completion_hidden(
        self, images: ImageBatch, rows: list[int], completions: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states of the positions that predict each completion token (grad flows through LoRA).

        Each distinct image's prompt (image tokens included) runs **once** — its KV cache is then shared by all of
        its completions — instead of once per completion: for G = 8 captions of ~30 tokens after a ~300-token
        prompt that is ~4x fewer tokens through the model. Gradients flow through the shared prefix.

        Args:
            images: the encoded images; rows[i] is the image of completion i.
            completions: [T_i] token ids each (T_i >= 1).

        Returns:
            hidden [N, H] (N = Σ T_i, packed), token_ids [N], seq_index [N] in [0, len(completions)).
        """
        groups = list(dict.fromkeys(rows))  # distinct images, in order of first use
        cache, last, prompt_mask, next_pos = self.prefill(images, groups)
        owner = torch.tensor([groups.index(r) for r in rows], device=self.device)
        cache.batch_select_indices(owner)  # one cache row per completion (a gather: differentiable)
        length = max(len(c) for c in completions)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long, device=self.device)
        comp_mask = torch.zeros_like(ids)
        for i, c in enumerate(completions):
            ids[i, : len(c)], comp_mask[i, : len(c)] = c, 1
        steps = torch.arange(length, device=self.device)
        positions = (next_pos[owner][:, None] + steps).expand(3, -1, -1)
        out = self.vl.language_model(
            inputs_embeds=self.vl.get_input_embeddings()(ids),
            attention_mask=torch.cat([prompt_mask[owner], comp_mask], dim=1),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        # Token 0 of a completion is predicted by its prompt's last position, token j by completion position j - 1.
        hidden = torch.cat([last[owner][:, None], out.last_hidden_state[:, :-1]], dim=1)
        keep = comp_mask.bool()
        seq_index = torch.arange(len(rows), device=self.device)[:, None].expand_as(ids)[keep]
        return hidden[keep], ids[keep], seq_index
