"""DeepSpeed ZeRO-2 as a `distributed.engine` (DeepSpeed is an optional extra: `pip install uae-fast[deepspeed]`).

The stage's own torch AdamW is handed to `deepspeed.initialize` (DeepSpeed's fused Adam would be JIT-compiled at
start, minutes on a CPU), which partitions its state and the gradients of the trained parameters over the ranks.
DeepSpeed takes its ZeRO settings from `configs/deepspeed/zero2.json` (or `distributed.deepspeed_config`); the
batch settings, gradient clipping and accumulation come from the stage: each micro-batch is a `backward`, and only
the step's last pass is a gradient-accumulation boundary. Checkpoints stay whole tensors (DeepSpeed's
`safe_get_full_*` / `safe_set_full_*`), so a ZeRO run resumes on any world size or engine, with no merge script.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import ConfigError
from .engines import Engine

__all__ = ["ZeroEngine", "deepspeed_config"]

_ADAM_STATE = ("exp_avg", "exp_avg_sq")


def deepspeed_config(settings, *, max_grad_norm: float) -> dict:
    """The DeepSpeed config: the shipped (or given) ZeRO file, with the batch and clipping settings the stage owns."""
    path = settings.deepspeed_config or resources.files("uae_fast.train") / "configs" / "deepspeed" / "zero2.json"
    try:
        config = json.loads(Path(str(path)).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path} ({exc})") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 2:
        raise ConfigError(f"{path}: zero_optimization.stage must be 2 for distributed.engine=zero2, got {stage}")
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"{path}: drop 'optimizer' / 'scheduler': the stage builds AdamW and its LR schedule")
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,  # the stage marks its accumulation boundaries itself
        gradient_clipping=max(max_grad_norm, 0.0),
    )
    return config


class ZeroEngine(Engine):
    """DeepSpeed ZeRO-2 over one optimizer's parameters (the trained modules of one stage)."""

    name = "zero2"
    lockstep = True  # gradients are reduced in every backward

    def attach(self, modules, optimizer, max_grad_norm: float):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("distributed.engine=zero2 needs DeepSpeed: pip install 'uae-fast[deepspeed]'") from None
        super().attach(modules, optimizer, max_grad_norm)
        config = deepspeed_config(self.settings, max_grad_norm=max_grad_norm)
        holder = torch.nn.ModuleList(modules)  # DeepSpeed finds the trained parameters through one module
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(model=holder, optimizer=optimizer, config=config)
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.runtime.world_size)

    def step(self, optimizers) -> float:
        if optimizers != [self.optimizer]:
            raise ConfigError("distributed.engine=zero2 trains one optimizer per stage; use ddp or fsdp2 here")
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips at gradient_clipping, steps, clears the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def optimizer_state(self, optimizer) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {}
        step = self._step_count()
        for index, p in enumerate(self.params):
            full = {key: safe_get_full_optimizer_state(p, key) for key in _ADAM_STATE}
            if step is not None:
                state[index] = {"step": torch.tensor(float(step)), **{k: v.detach().cpu() for k, v in full.items()}}
        # The inner optimizer's groups hold DeepSpeed's flat partitions now: describe the original parameters instead.
        (group,) = optimizer.state_dict()["param_groups"]
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        restored = [p.detach().clone() for p in self.params]
        if self._step_count() is None:  # DeepSpeed creates its optimizer state at the first step: one with zero grads
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(sum(p.sum() for p in self.params) * 0.0)
            self.engine.step()
        for p, weights in zip(self.params, restored):  # ZeRO keeps its own fp32 master copy: take the restored weights
            safe_set_full_fp32_param(p, weights.float())
            with torch.no_grad():
                p.copy_(weights)
        for index, per_param in state["state"].items():
            p = self.params[int(index)]
            for key in _ADAM_STATE:
                safe_set_full_optimizer_state(p, per_param[key].float(), key)
        steps = {float(s["step"]) for s in state["state"].values()}
        for inner in self.zero_optimizer.optimizer.state.values():
            if steps and "step" in inner:
                inner["step"] = torch.tensor(max(steps)) if torch.is_tensor(inner["step"]) else max(steps)
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _step_count(self):
        """Optimizer steps taken (the inner AdamW's `step` of its flat partitions), None before the first."""
        for inner in self.zero_optimizer.optimizer.state.values():
            if "step" in inner:
                return float(inner["step"])
        return None
