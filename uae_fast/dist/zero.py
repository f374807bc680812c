"""DeepSpeed ZeRO-2 and ZeRO-3 as `distributed.engine`s (DeepSpeed is an optional extra: `pip install
uae-fast[deepspeed]`).

The stage's own torch AdamW is handed to `deepspeed.initialize` (DeepSpeed's fused Adam would be JIT-compiled at
start, minutes on a CPU), which partitions its state and the gradients of the trained parameters over the ranks;
ZeRO-3 partitions the weights of the trained modules too (their frozen base included), gathering each module's
weights around its forward and backward. DeepSpeed takes its ZeRO settings from `configs/deepspeed/zero2.json` /
`zero3.json` (or `distributed.deepspeed_config`); the batch settings, gradient clipping and accumulation come from
the stage: each micro-batch is a `backward`, and only the step's last pass is a gradient-accumulation boundary.
Checkpoints stay whole tensors (DeepSpeed's `safe_get_full_*` / `safe_set_full_*`), so a ZeRO run resumes on any
world size or engine, with no merge script.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path

import torch
import torch.utils.checkpoint

from ..errors import ConfigError
from .engines import Engine

__all__ = ["Zero3Engine", "ZeroEngine", "deepspeed_config"]

_ADAM_STATE = ("exp_avg", "exp_avg_sq")


def deepspeed_config(settings, *, stage: int, max_grad_norm: float) -> dict:
    """The DeepSpeed config: the shipped (or given) ZeRO file, with the batch and clipping settings the stage owns."""
    shipped = resources.files("uae_fast.train") / "configs" / "deepspeed" / f"zero{stage}.json"
    path = settings.deepspeed_config or shipped
    try:
        config = json.loads(Path(str(path)).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path} ({exc})") from None
    found = config.get("zero_optimization", {}).get("stage")
    if found != stage:
        raise ConfigError(
            f"{path}: zero_optimization.stage must be {stage} for distributed.engine=zero{stage}, got {found}"
        )
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"{path}: drop 'optimizer' / 'scheduler': the stage builds AdamW and its LR schedule")
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,  # the stage marks its accumulation boundaries itself
        gradient_clipping=max(max_grad_norm, 0.0),
    )
    return config


class ZeroEngine(Engine):
    """DeepSpeed ZeRO-2 over the trained modules of one stage (its optimizers stepped as one)."""

    name = "zero2"
    stage = 2
    lockstep = True  # gradients are reduced in every backward

    def attach(self, modules, optimizers, max_grad_norm: float):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError(f"distributed.engine={self.name} needs DeepSpeed: pip install 'uae-fast[deepspeed]'") from None
        super().attach(modules, optimizers, max_grad_norm)
        # DeepSpeed swaps its flat partitions into the optimizer's groups: keep each optimizer's own parameters.
        self.params_of = {id(opt): [p for group in opt.param_groups for p in group["params"]] for opt in optimizers}
        config = deepspeed_config(self.settings, stage=self.stage, max_grad_norm=max_grad_norm)
        self.holder = torch.nn.ModuleList(modules)  # DeepSpeed finds the trained parameters through one module
        # DeepSpeed takes one optimizer: several (the cold start's two adapters) become one over all their groups —
        # the same group dicts, so each LR schedule still sets its own groups' learning rate.
        (inner,) = optimizers if len(optimizers) == 1 else [_joint(optimizers)]
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(model=self.holder, optimizer=inner, config=config)

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.runtime.world_size)

    def step(self, optimizers) -> float:
        if {id(o) for o in optimizers} != {id(o) for o in self.optimizers}:  # DeepSpeed steps them all as one
            raise RuntimeError(f"distributed.engine={self.name} steps every optimizer it holds at once")
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips at gradient_clipping, steps, clears the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def optimizer_state(self, optimizer) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {}
        step = self._step_count()
        for index, p in enumerate(self.params_of[id(optimizer)]):
            full = {key: safe_get_full_optimizer_state(p, key) for key in _ADAM_STATE}
            if step is not None:
                state[index] = {"step": torch.tensor(float(step)), **{k: v.detach().cpu() for k, v in full.items()}}
        # The inner optimizer's groups hold DeepSpeed's flat partitions now: describe the original parameters instead.
        (group,) = optimizer.param_groups  # (its state_dict() no longer maps: ZeRO-3 replaced the tensors)
        settings = {k: v for k, v in group.items() if k != "params"}
        return {"state": state, "param_groups": [{**settings, "params": list(range(len(state)))}]}

    def load(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())  # ZeRO's fp32 master copy (trained parameters only)
        super().load(param, value)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        restored = [self.full(p).clone() for p in self.params]  # every optimizer's: the warm step moves them all
        if self._step_count() is None:  # DeepSpeed creates its optimizer state at the first step: one with zero grads
            with self.direct_use(self.params):
                self.backward(sum(p.sum() for p in self.params) * 0.0)
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.step()
        for p, weights in zip(self.params, restored):  # the warm step's weight decay moved them: restore
            self.load(p, weights)
        params = self.params_of[id(optimizer)]
        for index, per_param in state["state"].items():
            p = params[int(index)]
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


class Zero3Engine(ZeroEngine):
    """DeepSpeed ZeRO-3: the trained modules' weights partitioned too, each module's gathered around its passes.

    The stages call submodules directly (not DeepSpeed's engine): DeepSpeed's hooks on every submodule still gather
    and release their weights, and each backward first closes the previous micro-batch (what `engine.forward` would
    do), so gradients accumulate. A weight read outside its module's forward (the fused loss reads `lm_head.weight`)
    is gathered by :meth:`direct_use` for the loss and its backward. Rollouts and the other unsynchronised passes run
    in :meth:`gathered`: the whole modules gathered once and the hooks off, so ranks need not run them in lockstep.
    """

    name = "zero3"
    stage = 3
    _gathered_depth = 0  # gathered() may nest (a report inside the final gathering): only the outermost acts

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        self.zero_optimizer.clear_backward_seen_flag()  # a new micro-batch: accumulate onto the previous ones
        super().backward(loss, last=last)

    @contextlib.contextmanager
    def gathered(self):
        if self._gathered_depth:  # already whole, hooks already off
            yield
            return
        import deepspeed

        offload = self.zero_optimizer.parameter_offload
        self._gathered_depth += 1
        with deepspeed.zero.GatheredParameters(list(self.holder.parameters())):
            for param in self.holder.parameters():
                param.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:  # hooks back on, with the forward order traced afresh (these passes were not traced)
                if not offload.param_coordinator.is_invalid_trace():
                    offload.param_coordinator._invalidate_trace()
                offload._register_deepspeed_module(offload.module)
                self._gathered_depth -= 1

    def whole_state_dicts(self):
        return self.gathered()

    def checkpoint(self, function, *args):
        # torch's checkpoint holds on to the frozen weights the forward used, and ZeRO-3 partitions them again after
        # the recompute's forward, so its shape check finds them empty (DeepSpeed defers that release only for a
        # recompute that starts inside a hooked module's backward). The values are right: each module's backward
        # gathers its weights first. The reentrant checkpoint is no way out: its backward per region hands ZeRO-3
        # a weight's gradient once per sampler step, which its reduction buckets refuse.
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, determinism_check="none")

    def direct_use(self, params: list[torch.nn.Parameter]):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")])

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        if not hasattr(tensor, "ds_id"):  # not a ZeRO-3 parameter (a buffer, or outside the trained modules)
            return tensor.detach()
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        whole = safe_get_full_fp32_param(tensor)  # the fp32 master of a trained parameter, None for a frozen one
        if whole is None:
            with deepspeed.zero.GatheredParameters([tensor]):
                whole = tensor.detach().clone()
        return whole.to(tensor.dtype)

    def load(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        if not hasattr(param, "ds_id"):
            super().load(param, value)
            return
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())  # the fp32 master (trained parameters only)
        self._write_partition(param.ds_tensor, value)  # every rank its own part of the working copy
        if self._held_whole(param):
            self._copy_whole(param, value)

    def local(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_id") else param

    def full_local(self, param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
        if not hasattr(param, "ds_id"):
            return super().full_local(param, tensor)
        # rank r holds elements [r·n, (r + 1)·n) of the flattened weight, padded at the end
        parts = [torch.empty_like(tensor) for _ in range(self.runtime.world_size)]
        torch.distributed.all_gather(parts, tensor.detach().contiguous())
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    def load_local(self, param: torch.nn.Parameter, tensor: torch.Tensor, value: torch.Tensor) -> None:
        if not hasattr(param, "ds_id"):
            super().load_local(param, tensor, value)
            return
        self._write_partition(tensor, value)

    def compute_with(self, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
        if not hasattr(param, "ds_id"):
            super().compute_with(param, tensor)
            return
        with torch.no_grad():
            param.ds_tensor.copy_(tensor)
        if self._held_whole(param):
            self._copy_whole(param, self.full_local(param, tensor))

    @staticmethod
    def _held_whole(param) -> bool:
        """DeepSpeed holds this weight whole right now (one under `stage3_param_persistence_threshold` elements,
        once fetched: the same on every rank) and computes from that copy, not from its partition."""
        return param.data.numel() == param.ds_numel

    @staticmethod
    def _copy_whole(param, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype).view_as(param.data))

    def _write_partition(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """This rank's part of the whole `value` into `tensor`, laid out as a ZeRO-3 partition."""
        n = tensor.numel()
        piece = value.reshape(-1)[self.runtime.rank * n : (self.runtime.rank + 1) * n]
        with torch.no_grad():
            tensor.zero_()
            tensor[: len(piece)].copy_(piece.to(tensor.device, tensor.dtype))


def _joint(optimizers: list[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """One optimizer of the same class over the param groups of all of `optimizers` (the group dicts themselves,
    not copies: a scheduler of one of them still sets the learning rate that the joint one steps with)."""
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    joint = type(optimizers[0])(groups)
    if not all(a is b for a, b in zip(joint.param_groups, groups)):
        raise RuntimeError(f"{type(joint).__name__} copied its param groups: the LR schedules would not reach it")

    def mark_parts_stepped(*_):  # each part's LR schedule warns unless its optimizer stepped (torch's flag)
        for part in optimizers:
            part._opt_called = True

    joint.register_step_post_hook(mark_parts_stepped)
    return joint
