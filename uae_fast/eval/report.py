"""Self-contained HTML report of a Unified-Bench run: summary, histograms and a sortable per-image table.

Everything is inline (CSS, a small sort script, SVG histograms drawn here in Python so they render even with
scripts disabled); images are referenced by paths relative to the report, so the folder can be moved or zipped.
On load the script sorts the table by the mean score, worst first — the reconstructions to look at — or by the
column named in the URL (``report.html#sort=clip:desc``), and marks the table with ``data-sorted-by`` /
``data-sort-dir`` (the browser test checks the rendered DOM for both).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["render_report", "histogram_svg"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse} th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;cursor:pointer;user-select:none;white-space:nowrap}
th[data-dir=asc]::after{content:" \\25B2"} th[data-dir=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.cap{max-width:420px;font-size:12px}
img.thumb{width:160px;height:auto;display:block} .hists{display:flex;gap:24px;flex-wrap:wrap}
.muted{color:#888} .summary td{text-align:right}
"""

# Sorting keys live in data-v attributes (numbers, or text) so the displayed formatting never affects the order.
_JS = """
(function(){
  var table=document.getElementById('results'); if(!table) return;
  var body=table.tBodies[0], heads=table.tHead.rows[0].cells;
  function key(row,i,num){var v=row.cells[i].getAttribute('data-v'); return num?(v===''?NaN:parseFloat(v)):v||'';}
  function sortBy(i,dir){
    var num=heads[i].getAttribute('data-type')==='num', rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a,i,num),y=key(b,i,num);
      if(num){if(isNaN(x))return 1; if(isNaN(y))return -1; return dir==='asc'?x-y:y-x;}
      return dir==='asc'?x.localeCompare(y):y.localeCompare(x);});
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<heads.length;j++) heads[j].removeAttribute('data-dir');
    heads[i].setAttribute('data-dir',dir);
    table.setAttribute('data-sorted-by',heads[i].getAttribute('data-key')); table.setAttribute('data-sort-dir',dir);
  }
  Array.prototype.forEach.call(heads,function(h,i){h.addEventListener('click',function(){
    sortBy(i,h.getAttribute('data-dir')==='asc'?'desc':'asc');});});
  // Initial order: #sort=KEY:asc|desc in the URL (shareable views), else the mean score, worst first.
  var m=/sort=([a-z0-9_]+):(asc|desc)/.exec(location.hash), want=m?m[1]:'mean', dir=m?m[2]:'asc';
  for(var i=0;i<heads.length;i++) if(heads[i].getAttribute('data-key')===want) sortBy(i,dir);
})();
"""


def histogram_svg(values: Sequence[float], *, bins: int = 10, title: str, element_id: str, lo=None, hi=None) -> str:
    """An inline SVG bar histogram with one ``<rect class="bar">`` per bin (count in ``data-count``)."""
    width, height, pad = 320, 160, 28
    vals = [v for v in values if v is not None and math.isfinite(v)]
    lo = min(vals, default=0.0) if lo is None else lo
    hi = max(vals, default=1.0) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    top = max(counts, default=0) or 1
    bar_w = (width - 2 * pad) / bins
    parts = [
        f'<svg id="{element_id}" class="hist" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)} (n={len(vals)})</text>',
    ]
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * c / top
        x, y = pad + i * bar_w, height - pad - h
        edge = lo + (hi - lo) * i / bins
        parts.append(
            f'<rect class="bar" data-count="{c}" x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
            f'fill="#4a7bd0"><title>{edge:.3g}–{edge + (hi - lo) / bins:.3g}: {c}</title></rect>'
        )
    axis = height - pad
    parts.append(f'<line x1="{pad}" y1="{axis}" x2="{width - pad}" y2="{axis}" stroke="#444"/>')
    parts.append(f'<text x="{pad}" y="{axis + 14}" font-size="10">{lo:.3g}</text>')
    parts.append(f'<text x="{width - pad}" y="{axis + 14}" font-size="10" text-anchor="end">{hi:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _src(path: str, base: Path | None) -> str:
    if base is not None and os.path.isabs(path):
        path = os.path.relpath(path, base)
    return html.escape(Path(path).as_posix(), quote=True)


def _mean(scores: dict) -> float | None:
    vals = [v for v in scores.values() if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(scores) else None


def render_report(results: dict, *, title: str = "Unified-Bench", base: Path | None = None) -> str:
    """HTML of a results dict from :func:`uae_fast.eval.bench.build_results`.

    Args:
        results: The results (its ``pairs``, ``unified_bench``, ``skipped``, ``model_types``).
        title: Page heading.
        base: Folder of the HTML file; absolute image paths are made relative to it.
    """
    models = results["model_types"]
    pairs = results.get("pairs", [])
    table = results.get("unified_bench", {})
    esc = html.escape
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<table class='summary' id='summary'><tr><th></th>"
        + "".join(f"<th>{esc(m)}</th>" for m in [*models, "overall"])
        + "</tr><tr><th>score (mean cos × 100)</th>"
        + "".join(f"<td>{table[m]:.2f}</td>" if m in table else "<td>–</td>" for m in [*models, "overall"])
        + "</tr>",
    ]
    paper = results.get("paper_uae")
    if paper:
        out.append(
            "<tr><th class='muted'>paper (UAE)</th>"
            + "".join(f"<td class='muted'>{paper.get(m, '–')}</td>" for m in [*models, "overall"])
            + "</tr>"
        )
    out.append(f"</table><p>{len(pairs)} pair(s) scored, {len(results.get('skipped', []))} file(s) skipped.</p>")

    captions = [p["caption"] for p in pairs if p.get("caption") is not None]
    means = [_mean(p["scores"]) for p in pairs]
    out.append("<h2>Distributions</h2><div class='hists'>")
    if captions:
        lengths = [len(c.split()) for c in captions]
        out.append(histogram_svg(lengths, title="caption length (words)", element_id="hist-caption-length"))
    out.append(histogram_svg(means, title="mean cosine per image", element_id="hist-scores"))
    for m in models:
        vals = [p["scores"].get(m) for p in pairs]
        out.append(histogram_svg(vals, title=f"{m} cosine", element_id=f"hist-{m}"))
    out.append("</div>")

    heads = [("index", "#", "num"), ("source", "source", "text"), ("recon", "reconstruction", "text")]
    heads += [("caption", "caption", "text"), ("words", "words", "num")]
    heads += [(m, m, "num") for m in models] + [("mean", "mean", "num")]
    out.append("<h2>Pairs</h2><p class='muted'>Click a column to sort.</p><table id='results'><thead><tr>")
    out += [f"<th data-key='{k}' data-type='{t}'>{esc(label)}</th>" for k, label, t in heads]
    out.append("</tr></thead><tbody>")
    for i, (p, mean) in enumerate(zip(pairs, means)):
        cap = p.get("caption")
        cells = [
            f"<td class='num' data-v='{i}'>{i + 1}</td>",
            f"<td data-v='{esc(p['reference'], quote=True)}'><img class='thumb' loading='lazy' alt='source' "
            f"src='{_src(p['ref_path'], base)}'><span class='muted'>{esc(p['reference'])}</span></td>",
            f"<td data-v='{esc(p['name'], quote=True)}'><img class='thumb' loading='lazy' alt='reconstruction' "
            f"src='{_src(p['recon_path'], base)}'><span class='muted'>{esc(p['name'])}</span></td>",
            f"<td class='cap' data-v='{esc(cap or '', quote=True)}'>{esc(cap) if cap is not None else '–'}</td>",
            f"<td class='num' data-v='{len(cap.split()) if cap is not None else ''}'>"
            f"{len(cap.split()) if cap is not None else '–'}</td>",
        ]
        for m in models + ["mean"]:
            v = mean if m == "mean" else p["scores"].get(m)
            cells.append(
                f"<td class='num' data-v='{'' if v is None else repr(v)}'>{'–' if v is None else f'{v:.4f}'}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    skipped = results.get("skipped", [])
    if skipped:
        out.append("<h2>Skipped</h2><ul id='skipped'>")
        out += [f"<li><code>{esc(s['file'])}</code>: {esc(s['reason'])}</li>" for s in skipped]
        out.append("</ul>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)
