"""How a stage's trained weights live on the ranks and how their gradients meet: `distributed.engine`.

- `ddp`: every rank holds every weight; each optimizer step all-reduces the trained parameters' gradients once
  (one flat buffer, after all micro-batches: what torch DDP does under `no_sync` for gradient accumulation), then
  clips and steps. In one process this is plain training.
- `fsdp2`: torch FSDP2 (`fully_shard`) on every transformer block that holds trained parameters: their weights,
  gradients and optimizer state are split over the ranks; the rest of the trained parameters stay replicated.
- `zero2` / `zero3`: DeepSpeed ZeRO-2 / ZeRO-3 (see :mod:`uae_fast.dist.zero`).

Every engine sees the same contract from the stages: the loss of a rank is its share of the *global* batch's loss
(normalised by global counts), gradients are averaged over the ranks, so :meth:`Engine.backward` scales by the
world size and N ranks step exactly as one process on the whole batch. Checkpoints hold *full* tensors in the
released layout (:meth:`Engine.full`, :meth:`Engine.optimizer_state`): they load on any world size and engine.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from ..errors import ConfigError
from ..train.settings import ENGINES
from .runtime import Runtime

__all__ = ["ENGINES", "Engine", "FSDP2Engine", "held_bytes", "make_engine", "transformer_blocks"]


class Engine:
    """The `ddp` engine, and the interface of the others."""

    name = "ddp"
    # A forward or backward of the trained model talks to the other ranks (sharded weights, gradients reduced per
    # pass): every rank must then run the same number of passes (see :meth:`passes`).
    lockstep = False

    def __init__(self, runtime: Runtime, settings=None):
        self.runtime = runtime
        self.settings = settings
        self.params: list[torch.nn.Parameter] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    # ------------------------------------------------------------------ building
    def shard(self, modules: list[torch.nn.Module]) -> None:
        """Place `modules` (those holding the trained parameters) on the ranks; before the optimizer is built."""

    def shard_frozen(self, module: torch.nn.Module) -> None:
        """Shard the blocks of a frozen `module` over the ranks too (`distributed.shard_frozen`, fsdp2; elsewhere
        every rank holds it whole): each block is gathered for its forward, so every rank must then run the same
        forwards of it, and a pass that is not in lockstep runs in :meth:`frozen_gathered`."""

    def attach(self, modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], max_grad_norm: float):
        """Take charge of `optimizers` over the trainable parameters of `modules` (every optimizer of the stage, in
        one call: their steps are one step, clipped at one global norm)."""
        if self.optimizers:
            raise RuntimeError(f"the {self.name} engine already holds its stage's optimizers")
        self.optimizers = list(optimizers)
        self.params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        self.max_grad_norm = max_grad_norm

    # ------------------------------------------------------------------ a step
    def passes(self, count: int) -> int:
        """How many forward/backward passes this rank runs when it has `count` of its own: the most of any rank
        when the engine is in lockstep (the extra ones are zero-weighted repeats), else `count`."""
        return self.runtime.max(count) if self.lockstep else count

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Backward of this rank's share of the global loss; `last`: the step's final pass."""
        (loss * self.runtime.world_size).backward()

    def step(self, optimizers: list[torch.optim.Optimizer]) -> float:
        """Average the gradients over the ranks, clip their global norm at `max_grad_norm` (0: no clipping), step
        every optimizer and clear the gradients. Returns the norm before clipping."""
        self._all_reduce_replicated()
        norm = clip_grad_norm(self.params, self.max_grad_norm, self.runtime)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norm

    def _all_reduce_replicated(self) -> None:
        """Average the gradients of the replicated (not sharded) trained parameters: one flat all-reduce."""
        if not self.runtime.distributed:
            return
        params = [p for p in self.params if not _is_dtensor(p)]
        # A parameter no rank gave a gradient keeps none (the optimizer skips it, as in one process); one that only
        # some ranks touched takes part with zeros elsewhere.
        touched = self.runtime.sum(*[float(p.grad is not None) for p in params]) if params else []
        params = [p for p, t in zip(params, touched) if t > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.runtime.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def checkpoint(self, function, *args):
        """`function(*args)` with its activations recomputed in the backward instead of kept (activation
        checkpointing the way this engine supports it)."""
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    # ------------------------------------------------------------------ whole weights
    def gathered(self):
        """Context in which the trained modules hold whole weights on every rank, for passes that are not in
        lockstep (rollouts, reference and old log-probs, evaluation, reports)."""
        return contextlib.nullcontext()

    def frozen_gathered(self):
        """Context in which the frozen modules sharded by :meth:`shard_frozen` are whole on every rank, for passes
        of them that are not in lockstep."""
        return contextlib.nullcontext()

    def whole_state_dicts(self):
        """Context in which `state_dict()` of the trained modules holds whole tensors (every rank must then take
        the same state dicts: gathering is a collective)."""
        return contextlib.nullcontext()

    def direct_use(self, params: list[torch.nn.Parameter]):
        """Context for a training pass that reads `params` outside their module's forward (the fused loss reads the
        LM head's weight): the loss and its backward run inside it, on every rank (zero3 gathers them)."""
        return contextlib.nullcontext()

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor behind `tensor` (a collective when it is sharded: every rank calls it)."""
        return tensor.detach()

    def load(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Copy the whole tensor `value` into `param` (this rank's shard of it when sharded)."""
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))

    def local(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The part of `param` this rank holds and computes with (zero3: its flat partition; else `param`)."""
        return param

    def full_local(self, param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor of which `tensor` is this rank's part, laid out as `local(param)` (a collective)."""
        return self.full(tensor)

    def load_local(self, param: torch.nn.Parameter, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Copy this rank's part of the whole tensor `value` into `tensor`, laid out as `local(param)`."""
        self.load(tensor, value)

    def compute_with(self, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
        """Make `param` compute with the values whose part on this rank is `tensor` (laid out as `local(param)`;
        every rank calls it: zero3 gathers the weights it holds whole)."""
        with torch.no_grad():
            self.local(param).copy_(tensor)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` with whole tensors (every rank calls it)."""
        state = optimizer.state_dict()
        return {
            "state": {i: {k: self.full(v) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"],
        }

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a whole-tensor optimizer state (as :meth:`optimizer_state` gives it), sharding it like the params."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        placed = {}
        for index, per_param in state["state"].items():
            p = params[int(index)]
            placed[index] = {k: self._place_like(p, v) if v.dim() else v for k, v in per_param.items()}
        optimizer.load_state_dict({"state": placed, "param_groups": state["param_groups"]})

    def _place_like(self, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        return value.to(param.device)


class FSDP2Engine(Engine):
    """torch FSDP2: each transformer block holding trained parameters is a `fully_shard` unit."""

    name = "fsdp2"
    lockstep = True

    units: list[torch.nn.Module] = []  # the trained modules' sharded blocks
    frozen_units: list[torch.nn.Module] = []  # those of frozen modules (distributed.shard_frozen)

    def shard_frozen(self, module: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        blocks = transformer_blocks(module, trained_only=False)
        for block in blocks:
            fully_shard(block)
        self.frozen_units = [*self.frozen_units, *blocks]

    def shard(self, modules: list[torch.nn.Module]) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.units = list(self.units)
        for module in modules:
            for block in transformer_blocks(module):
                dtypes = {p.dtype for p in block.parameters()}
                policy = MixedPrecisionPolicy()
                if len(dtypes) > 1:  # FSDP2 gathers one dtype per unit: keep fp32 shards, compute as the model does
                    compute = min(dtypes, key=lambda d: torch.finfo(d).bits)
                    block.float()
                    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
                fully_shard(block, mp_policy=policy)
                self.units.append(block)

    def gathered(self):
        return self._unsharded(self.units)

    def frozen_gathered(self):
        return self._unsharded(self.frozen_units)

    @contextlib.contextmanager
    def _unsharded(self, units: list[torch.nn.Module]):
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False)  # forwards then gather nothing: ranks need not run in lockstep
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True)

    @contextlib.contextmanager
    def whole_state_dicts(self):
        def whole(module, state_dict, prefix, local_metadata) -> None:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                state_dict[key] = self.full(state_dict[key])

        handles = [unit.register_state_dict_post_hook(whole) for unit in [*self.units, *self.frozen_units]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().full_tensor() if _is_dtensor(tensor) else tensor.detach()

    def load(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            if _is_dtensor(param):
                param.to_local().copy_(self._place_like(param, value).to_local())
            else:
                param.copy_(value.to(param.device, param.dtype))

    def _place_like(self, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        if not _is_dtensor(param):
            return value.to(param.device)
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.to_local().device, param.dtype), param.device_mesh, param.placements)


def transformer_blocks(module: torch.nn.Module, *, trained_only: bool = True) -> list[torch.nn.Module]:
    """The blocks of the repeated stacks (`nn.ModuleList` entries) in `module` that hold trainable parameters (or
    any, without `trained_only`) — the LLM's decoder layers, the DiT's joint blocks — outermost stacks only."""
    blocks, seen = [], set()
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or any(name.startswith(s + ".") for s in seen):
            continue
        members = [m for m in child if any(p.requires_grad or not trained_only for p in m.parameters())]
        if len(child) > 1 and members:
            blocks += members
            seen.add(name)
    return blocks


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters that this rank holds (its shards of the sharded ones)."""
    held = (p.to_local() if _is_dtensor(p) else p for p in module.parameters())
    return sum(t.numel() * t.element_size() for t in held)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, runtime: Runtime) -> float:
    """Clip the gradients of `params` (whole or FSDP2-sharded) at the global norm `max_norm` (0: only measure);
    torch's `clip_grad_norm_` rule: scale by min(1, max_norm / (norm + 1e-6)). Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if _is_dtensor(g)]
    whole = [g for g in grads if not _is_dtensor(g)]

    def squares(tensors) -> float:  # Σ‖g‖², each norm in fp32 (as torch's), summed in fp64; one host sync
        if not tensors:
            return 0.0
        return float(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in tensors]).double().pow(2).sum())

    shard_sq = squares(sharded)
    if runtime.distributed and any(_is_dtensor(p) for p in params):
        shard_sq = runtime.sum(shard_sq)[0]
    norm = (shard_sq + squares(whole)) ** 0.5
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in sharded + whole:
                g.mul_(coef)
    return norm


def make_engine(settings, runtime: Runtime) -> Engine:
    """The engine `settings.engine` names, for this process (one process trains plainly, whatever it names)."""
    if settings.engine == "ddp" or (settings.engine in ENGINES and not runtime.distributed):
        return Engine(runtime, settings)
    if settings.engine == "fsdp2":
        return FSDP2Engine(runtime, settings)
    if settings.engine in ("zero2", "zero3"):
        from .zero import Zero3Engine, ZeroEngine

        return (ZeroEngine if settings.engine == "zero2" else Zero3Engine)(runtime, settings)
    raise ConfigError(f"distributed.engine must be one of {', '.join(ENGINES)}, got {settings.engine!r}")


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"
