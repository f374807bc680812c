"""GRPO loss + LM head, forward and backward: uae_fast vs TRL's path vs Liger-Kernel vs the bare GEMMs.

Rows (same inputs, one process for the timings, interleaved repeats, median):
  ours            fused chunked loss, frozen head (LoRA: the head gets no gradient) — our default
  ours lean       1,024-token chunks, the vocabulary in 2,048-entry blocks (least memory)
  TRL             GRPOTrainer._compute_loss on full logits (selective_log_softmax, entropy, loss)
  Liger           LigerFusedLinearGRPOLoss(compiled=False)
  bare GEMMs      only the matmuls any exact loss must do (logits h·Wᵀ, d/dh = p·W, and for a trainable head
                  d/dW = pᵀ·h), at the fastest of a small search: token chunk x vocabulary block x GEMM layout
                  (see BARE_SEARCH), each candidate timed warm on the same inputs (median of --search-repeats),
                  the winner's settings in its row label. Nothing but GEMMs, so a floor for the rows above.
each for a frozen and a trainable head. Peak memory is measured per variant in a fresh process: the RSS high-water
mark above what the inputs already hold (on CUDA: `torch.cuda.max_memory_allocated` above the inputs).

    python benchmarks/bench_grpo_loss.py            # V=151,936, H=2048 and 1024, N = 8 captions x 256 tokens (CPU)
    python benchmarks/bench_grpo_loss.py --quick    # N = 128, H = 512, same rows, a smoke run
    python benchmarks/bench_grpo_loss.py --device cuda --dtype bf16   # on a GPU (our rows run the Triton kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
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
# The bare-GEMM candidates: token chunk (None = all N at once) x vocabulary block (None = the whole vocabulary) x
# layout. "vocab-major": logits stored [V_b, c] (W_b·hᵀ, the vocabulary as the GEMM's long side), "token-major":
# [c, V_b] (h·W_bᵀ); the gradient GEMMs read that buffer transposed or not as needed (no copies). Blocks keep W_b in
# cache between the logits GEMM and the gradient GEMMs that reuse it (that is why the lean row once won).
BARE_SEARCH = {"chunk": [256, 1024, None], "block": [None, 2048, 8192], "layout": ["vocab-major", "token-major"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n_tokens: int, hidden: int, seed: int = 0, device: str = "cpu", dtype=torch.float32):
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
    for k, v in vars(x).items():
        v = v.to(device)
        setattr(x, k, v.to(dtype) if k in ("hidden", "weight") else v)
    x.bare = {}  # train_head -> (chunk, block, layout) chosen by search_bare
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
def run_bare(x, train_head, chunk=None, block=None, layout=None):
    """The GEMMs any exact loss must do, chunk by chunk and block by block: logits z = h·W_bᵀ, then d/dh += z·W_b
    (and d/dW_b += zᵀ·h), accumulated in place over blocks and chunks (what a fused loss must keep). No softmax, no
    loss arithmetic. Settings default to those `search_bare` picked for this head (x.bare). Returns the buffers (for
    tests): d/dh of the last chunk [c, H] and d/dW [V, H] (None for a frozen head), with the logits as the "p"."""
    if chunk is None and block is None and layout is None and train_head in x.bare:
        chunk, block, layout = x.bare[train_head]
    layout = layout or "vocab-major"
    h, w = x.hidden.reshape(-1, x.hidden.shape[-1]), x.weight
    n_all, vocab = h.shape[0], w.shape[0]
    chunk, block = min(chunk or n_all, n_all), min(block or vocab, vocab)
    buf = torch.empty(chunk * block, dtype=w.dtype, device=w.device)
    grad_h = torch.empty(chunk, h.shape[1], dtype=w.dtype, device=w.device)
    grad_w = torch.empty_like(w) if train_head else None
    for a in range(0, n_all, chunk):
        hc = h[a : a + chunk]
        n = hc.shape[0]
        gh = grad_h[:n]
        for b in range(0, vocab, block):
            wb = w[b : b + block]
            m = wb.shape[0]
            first = 0.0 if b == 0 else 1.0
            if layout == "vocab-major":
                zt = buf[: m * n].view(m, n)  # [V_b, c]
                torch.mm(wb, hc.t(), out=zt)
                gh.addmm_(zt.t(), wb, beta=first)
                if train_head:
                    grad_w[b : b + m].addmm_(zt, hc, beta=0.0 if a == 0 else 1.0)
            else:
                z = buf[: m * n].view(n, m)  # [c, V_b]
                torch.mm(hc, wb.t(), out=z)
                gh.addmm_(z, wb, beta=first)
                if train_head:
                    grad_w[b : b + m].addmm_(z.t(), hc, beta=0.0 if a == 0 else 1.0)
    return grad_h, grad_w  # the last chunk's d/dh (a real loss would consume each chunk's) and d/dW


def bare_settings(settings) -> str:
    chunk, block, layout = settings
    return f"chunk {chunk or 'N'}, vocab block {block or 'V'}, {layout}"


def bare_label(settings) -> str:
    return f"bare GEMMs ({bare_settings(settings)})"


def search_bare(x, train_head: bool, repeats: int, sync=lambda: None) -> tuple[list[dict], tuple]:
    """Time every BARE_SEARCH candidate warm (1 warm-up, median of `repeats`) on x; store and return the fastest.

    Returns (one dict per candidate: settings and seconds, fastest first; the fastest settings)."""
    n_all = x.hidden.shape[0] * x.hidden.shape[1]
    seen, timed = set(), []
    for layout in BARE_SEARCH["layout"]:
        for chunk in BARE_SEARCH["chunk"]:
            for block in BARE_SEARCH["block"]:
                key = (None if chunk is None or chunk >= n_all else chunk, block, layout)
                if key in seen:
                    continue
                seen.add(key)
                run_bare(x, train_head, *key)
                sync()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run_bare(x, train_head, *key)
                    sync()
                    times.append(time.perf_counter() - start)
                timed.append({"settings": key, "time": statistics.median(times)})
    timed.sort(key=lambda r: r["time"])
    x.bare[train_head] = timed[0]["settings"]
    return timed, timed[0]["settings"]


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


def child(variant: str, n: int, hidden: int, train_head: bool, threads: int, device: str, dtype: str, bare) -> None:
    torch.set_num_threads(threads)
    _import_modules(variant)
    x = make_inputs(n, hidden, device=device, dtype=DTYPES[dtype])
    if bare:
        x.bare[train_head] = bare
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        RUNNERS[variant](x, train_head)
        torch.cuda.synchronize()
        return child_report({"peak_mb": torch.cuda.max_memory_allocated() / 2**20 - base})
    base = current_rss_mb()
    reset_peak_rss()
    RUNNERS[variant](x, train_head)
    child_report({"peak_mb": peak_rss_mb() - base})


def _synced(fn, device: str):
    if device != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def bench(
    n: int, hidden: int, repeats: int, threads: int, device="cpu", dtype="fp32", search_repeats=2, variants=VARIANTS
) -> str:
    torch.set_num_threads(threads)
    x = make_inputs(n, hidden, device=device, dtype=DTYPES[dtype])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows, searched = [], []
    for train_head in (False, True):
        timed, best = search_bare(x, train_head, search_repeats, sync)
        searched.append(
            f"{'trainable' if train_head else 'frozen'} head: "
            + "; ".join(f"{bare_settings(r['settings'])}: {r['time']:.3f} s" for r in timed)
        )
        fns = {v: _synced(lambda v=v: RUNNERS[v](x, train_head), device) for v in variants}
        times = interleaved_medians(fns, repeats=repeats, warmup=1)
        peaks = {}
        for v in variants:
            args = ["--child", v, "--n", str(n), "--hidden", str(hidden), "--threads", str(threads)]
            args += ["--device", device, "--dtype", dtype, "--bare", json.dumps(best)]
            peaks[v] = measure_peak_in_child(__file__, args + (["--train-head"] if train_head else []))["peak_mb"]
        fastest_peer = min((times[v] for v in ("TRL", "Liger") if v in times), default=0.0)
        na = "n/a"
        for v in variants:
            rows.append({
                "head": "trainable" if train_head else "frozen",
                "variant": bare_label(best) if v == "bare GEMMs" else v,
                "time (s)": f"{times[v]:.2f}",
                "peak (MB)": f"{peaks[v]:.0f}",
                "time / fastest peer": fmt_ratio(times[v], fastest_peer),
                "time / bare": fmt_ratio(times[v], times["bare GEMMs"]) if "bare GEMMs" in times else na,
                "peak / TRL": fmt_ratio(peaks[v], peaks["TRL"]) if "TRL" in peaks else na,
                "peak / Liger": fmt_ratio(peaks[v], peaks["Liger"]) if "Liger" in peaks else na,
            })  # fmt: skip
    columns = ["head", "variant", "time (s)", "peak (MB)", "time / fastest peer", "time / bare", "peak / TRL",
               "peak / Liger"]  # fmt: skip
    where = f"CUDA, {dtype}" if device == "cuda" else f"CPU, {dtype}, {threads} threads"
    title = f"N={n} tokens ({CAPTIONS} captions), H={hidden}, V={VOCAB}, {where}, median of {repeats}"
    search = "Bare-GEMM search (median of {} warm runs each, fastest first):\n".format(search_repeats)
    search += "\n".join(f"- {line}" for line in searched)
    return f"### {title}\n\n" + markdown_table(rows, columns) + "\n\n" + search


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=128 tokens, H=512, 2 repeats: a smoke run of every row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--search-repeats", type=int, default=None, help="timed runs per bare-GEMM candidate")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="rows to run (default: all)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--train-head", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare", type=json.loads, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if a.child:
        bare = tuple(a.bare) if a.bare else None
        return child(a.child, a.n, a.hidden[0], a.train_head, a.threads, a.device, dtype, bare)
    n = a.n or (128 if a.quick else CAPTIONS * 256)
    repeats = a.repeats or (2 if a.quick else 5)
    search_repeats = a.search_repeats or (1 if a.quick else 3)
    for hidden in a.hidden or ([512] if a.quick else [2048, 1024]):
        print(bench(n, hidden, repeats, a.threads, a.device, dtype, search_repeats, a.variants), flush=True)
        print()


if __name__ == "__main__":
    main()
