"""GRPO loss + LM head, forward and backward: uae_fast vs TRL's path vs Liger-Kernel vs the bare GEMMs (CPU, fp32).

Rows (same inputs, one process for the timings, interleaved repeats, median):
  ours            fused chunked loss, frozen head (LoRA: the head gets no gradient) — our default
  ours lean       1,024-token chunks, the vocabulary in 2,048-entry blocks (least memory)
  TRL             GRPOTrainer._compute_loss on full logits (selective_log_softmax, entropy, loss)
  Liger           LigerFusedLinearGRPOLoss(compiled=False)
  bare GEMMs      only the matmuls the loss cannot avoid (h·Wᵀ, then the gradient GEMMs), same chunking
each for a frozen and a trainable head. Peak memory is measured per variant in a fresh process: the RSS high-water
mark above what the inputs already hold.

    python benchmarks/bench_grpo_loss.py            # V=151,936, H=2048 and 1024, N = 8 captions x 256 tokens
    python benchmarks/bench_grpo_loss.py --quick    # N = 128, H = 512, same rows, a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import (  # noqa: E402
    child_report,
    current_rss_mb,
    fmt_ratio,
    interleaved_medians,
    markdown_table,
    measure_peak_in_child,
    peak_rss_mb,
    reset_peak_rss,
)

VOCAB = 151_936
CAPTIONS = 8
BETA, EPS_LOW, EPS_HIGH, TEMPERATURE = 0.04, 0.2, 0.28, 0.7
LEAN_BLOCK = 2048  # vocabulary block of the lean row: 49 MB peak at N=2048, under Liger's 58 MB
VARIANTS = ["ours", "ours lean", "TRL", "Liger", "bare GEMMs"]


def make_inputs(n_tokens: int, hidden: int, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    seqs = CAPTIONS
    per = n_tokens // seqs
    x = SimpleNamespace()
    x.hidden = torch.randn(seqs, per, hidden, generator=g)
    x.weight = torch.randn(VOCAB, hidden, generator=g) * 0.02
    x.ids = torch.randint(0, VOCAB, (seqs, per), generator=g)
    x.mask = torch.ones(seqs, per)
    x.adv = torch.randn(seqs, generator=g)
    x.old = -12 + 0.1 * torch.randn(seqs, per, generator=g)
    x.ref = -12 + 0.1 * torch.randn(seqs, per, generator=g)
    x.seq_index = torch.arange(seqs)[:, None].expand(seqs, per).reshape(-1)
    return x


def _leaf(x: SimpleNamespace, train_head: bool):
    """The inputs as autograd leaves, without copies (a [V, H] clone would be counted as the variant's memory)."""
    x.hidden.requires_grad_(True).grad = None
    x.weight.requires_grad_(train_head).grad = None
    return x.hidden, x.weight


def run_ours(x, train_head, lean=False):
    from uae_fast.kernels.grpo_loss import fused_linear_grpo_loss

    h, w = _leaf(x, train_head)
    loss, _, _ = fused_linear_grpo_loss(
        h.reshape(-1, h.shape[-1]), w, x.ids.reshape(-1), x.seq_index, x.adv, old_logp=x.old.reshape(-1),
        ref_logp=x.ref.reshape(-1), beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo",
        temperature=TEMPERATURE, chunk_size=1024 if lean else 256, vocab_block=LEAN_BLOCK if lean else None,
    )  # fmt: skip
    loss.backward()


class _TRLStub:
    """What GRPOTrainer._compute_loss reads; its log-probs come from full logits via TRL's own helpers."""

    def __init__(self, x, h, w):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        self.beta, self.loss_type, self.importance_sampling_level = BETA, "dapo", "token"
        self.epsilon_low, self.epsilon_high = EPS_LOW, EPS_HIGH
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm = self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps, self.max_completion_length = 1, x.ids.shape[1]
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.model = SimpleNamespace(training=True)
        ident = lambda t, **kw: t  # noqa: E731
        self.accelerator = SimpleNamespace(num_processes=1, gather=ident, reduce=ident, gather_for_metrics=ident)
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._h, self._w, self._ids, self._sls, self._ent = h, w, x.ids, selective_log_softmax, entropy_from_logits

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        logits = (self._h @ self._w.t()) / TEMPERATURE
        with torch.no_grad():
            entropies = self._ent(logits)
        return self._sls(logits, self._ids), entropies, None


def run_trl(x, train_head):
    from trl import GRPOTrainer

    h, w = _leaf(x, train_head)
    inputs = {
        "prompt_ids": torch.zeros(x.ids.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(x.ids.shape[0], 1),
        "completion_ids": x.ids,
        "completion_mask": x.mask,
        "advantages": x.adv,
        "old_per_token_logps": x.old,
        "ref_per_token_logps": x.ref,
        "num_items_in_batch": x.mask.sum(),
    }
    GRPOTrainer._compute_loss(_TRLStub(x, h, w), None, inputs).backward()


_LIGER = {}


def run_liger(x, train_head):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if "loss" not in _LIGER:
        _LIGER["loss"] = LigerFusedLinearGRPOLoss(
            beta=BETA, compiled=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo",
            temperature=TEMPERATURE,
        )  # fmt: skip
    h, w = _leaf(x, train_head)
    out = _LIGER["loss"](h, w, x.ids, x.mask, x.adv, ref_per_token_logps=x.ref, old_per_token_logps=x.old)
    (out[0] if isinstance(out, tuple) else out).backward()


@torch.no_grad()
def run_bare(x, train_head, chunk=256):
    """The GEMMs any exact loss must do, chunk by chunk: logits, then d/dh (and d/dW). Each in the fastest CPU layout
    we know (logits as W hᵀ into one reused buffer, see `block_logits`), so this row is the limit."""
    h, w = x.hidden.reshape(-1, x.hidden.shape[-1]), x.weight
    buf = torch.empty(w.shape[0] * min(chunk, h.shape[0]))
    grad_w = torch.empty_like(w) if train_head else None
    for a in range(0, h.shape[0], chunk):
        hc = h[a : a + chunk]
        zt = buf[: w.shape[0] * hc.shape[0]].view(w.shape[0], hc.shape[0])
        torch.mm(w, hc.t(), out=zt)
        _ = w.t() @ zt
        if train_head:
            grad_w.addmm_(zt, hc, beta=0.0 if a == 0 else 1.0)


RUNNERS = {
    "ours": run_ours,
    "ours lean": lambda x, t: run_ours(x, t, lean=True),
    "TRL": run_trl,
    "Liger": run_liger,
    "bare GEMMs": run_bare,
}


def _import_modules(variant: str) -> None:
    """Load a variant's modules before its memory baseline is taken: importing TRL alone adds ~360 MB of RSS,
    Liger ~150 MB, uae_fast ~80 MB — code, not the loss's working memory."""
    if variant.startswith("ours"):
        import uae_fast.kernels.grpo_loss  # noqa: F401
    elif variant == "TRL":
        import trl.trainer.utils  # noqa: F401
        from trl import GRPOTrainer  # noqa: F401
    elif variant == "Liger":
        import liger_kernel.chunked_loss  # noqa: F401


def child(variant: str, n: int, hidden: int, train_head: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    _import_modules(variant)
    x = make_inputs(n, hidden)
    base = current_rss_mb()
    reset_peak_rss()
    RUNNERS[variant](x, train_head)
    child_report({"peak_mb": peak_rss_mb() - base})


def bench(n: int, hidden: int, repeats: int, threads: int) -> str:
    torch.set_num_threads(threads)
    x = make_inputs(n, hidden)
    rows = []
    for train_head in (False, True):
        fns = {v: (lambda v=v: RUNNERS[v](x, train_head)) for v in VARIANTS}
        times = interleaved_medians(fns, repeats=repeats, warmup=1)
        peaks = {}
        for v in VARIANTS:
            args = ["--child", v, "--n", str(n), "--hidden", str(hidden), "--threads", str(threads)]
            peaks[v] = measure_peak_in_child(__file__, args + (["--train-head"] if train_head else []))["peak_mb"]
        fastest_peer = min(times["TRL"], times["Liger"])
        for v in VARIANTS:
            rows.append({
                "head": "trainable" if train_head else "frozen",
                "variant": v,
                "time (s)": f"{times[v]:.2f}",
                "peak (MB)": f"{peaks[v]:.0f}",
                "time / fastest peer": fmt_ratio(times[v], fastest_peer),
                "time / bare": fmt_ratio(times[v], times["bare GEMMs"]),
                "peak / TRL": fmt_ratio(peaks[v], peaks["TRL"]),
                "peak / Liger": fmt_ratio(peaks[v], peaks["Liger"]),
            })  # fmt: skip
    columns = ["head", "variant", "time (s)", "peak (MB)", "time / fastest peer", "time / bare", "peak / TRL",
               "peak / Liger"]  # fmt: skip
    title = f"N={n} tokens ({CAPTIONS} captions), H={hidden}, V={VOCAB}, fp32, {threads} threads, median of {repeats}"
    return f"### {title}\n\n" + markdown_table(rows, columns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=128 tokens, H=512, 2 repeats: a smoke run of every row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--train-head", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.n, a.hidden[0], a.train_head, a.threads)
    n = a.n or (128 if a.quick else CAPTIONS * 256)
    repeats = a.repeats or (2 if a.quick else 5)
    for hidden in a.hidden or ([512] if a.quick else [2048, 1024]):
        print(bench(n, hidden, repeats, a.threads), flush=True)
        print()


if __name__ == "__main__":
    main()
