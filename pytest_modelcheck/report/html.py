"""The ``--modelcheck-html`` report: one self-contained HTML page.

Inline CSS, no JavaScript, no network: plots are PNGs embedded as base64 ``data:`` URIs, so the
file can be attached to a CI run and opened anywhere. The page has the health table, the
regressions against a baseline (highlighted), and a section per model test with each check's
headline, details and, when a check recorded per-step losses, the loss curve.
"""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Optional

from .markdown import comparison_cells
from .terminal import health_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
h2,h3{overflow-wrap:anywhere}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.regressed td{background:#fde2e1}tr.improved td{background:#e3f6e5}
tr.inconclusive td{background:#fff4d6}tr.skipped-other td{color:#666}
.passed{color:#17692b;font-weight:600}.failed{color:#b3261e;font-weight:600}
.skipped{color:#777;font-weight:600}
pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.85em;margin:.3em 0 .8em}
.check{margin:.4em 0 .8em}.headline{font-family:ui-monospace,monospace;font-size:.9em}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#555}
img{max-width:560px;border:1px solid #eee}
.banner{padding:.6em 1em;border-radius:4px;margin:.5em 0}
.banner.bad{background:#fde2e1;border:1px solid #b3261e}
.banner.good{background:#e3f6e5;border:1px solid #17692b}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(nodeid: str) -> str:
    """A unique HTML id for a test: its readable form plus a short hash of the exact id."""
    import hashlib

    readable = "".join(c if c.isascii() and c.isalnum() else "-" for c in nodeid)[:80]
    return f"t-{readable}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


def loss_curve_png(losses: list, title: str = "loss") -> Optional[bytes]:
    """A PNG of a loss curve (log scale when positive), or None without matplotlib or points.

    >>> loss_curve_png([1.0, 0.5, 0.25])[:8] == PNG_MAGIC
    True
    """
    points = [(i, float(v)) for i, v in enumerate(losses)
              if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(points) < 2:
        return None
    try:
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(5.0, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = zip(*points)
    ax.plot(xs, ys, color="#1f5fa8", linewidth=1.4)
    if min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(title)}</figcaption></figure>")


def _plots_of(result: dict) -> list:
    """(title, png) pairs for a result: its loss curve, and a saved PNG named in metrics."""
    out = []
    metrics = result.get("metrics") or {}
    losses = metrics.get("losses")
    if isinstance(losses, list):
        png = loss_curve_png(losses, f"{result['check']}: loss per step")
        if png:
            out.append((f"{result['check']}: loss per step", png))
    plot = metrics.get("plot")
    if isinstance(plot, str) and plot.lower().endswith(".png") and os.path.isfile(plot):
        with open(plot, "rb") as fh:
            data = fh.read()
        if data.startswith(PNG_MAGIC):
            out.append((f"{result['check']}: {os.path.basename(plot)}", data))
    return out


def _health_table(rows: list, regressed_tests: set) -> list:
    out = ["<table><tr><th>test</th><th>params</th><th>peak memory</th><th>throughput</th>"
           "<th>checks passed</th><th>failed</th></tr>"]
    for row in rows:
        c = health_row(row)
        cls = ' class="regressed"' if row["nodeid"] in regressed_tests or c["failed"] else ""
        out.append(f'<tr{cls}><td><a href="#{_anchor(row["nodeid"])}">{_e(c["test"])}</a></td>'
                   f'<td class="num">{_e(c["params"])}</td><td class="num">{_e(c["peak"])}</td>'
                   f'<td class="num">{_e(c["throughput"])}</td><td>{_e(c["checks"])}</td>'
                   f'<td>{_e(c["failed"] or "-")}</td></tr>')
    out.append("</table>")
    return out


def _comparison_table(comps: list) -> list:
    out = ["<table><tr><th>test</th><th>metric</th><th>old</th><th>new</th><th>change</th>"
           "<th>kind</th><th>how</th><th>verdict</th></tr>"]
    for c in comps:
        cells = comparison_cells(c)
        cls = c.verdict if c.verdict in ("regressed", "improved", "inconclusive") else (
            "skipped-other" if c.verdict.startswith("skipped") else "")
        out.append(f'<tr class="{cls}">' + "".join(
            f'<td{" class=num" if i in (2, 3, 4) else ""}>{_e(v)}</td>'
            for i, v in enumerate(cells)) + f"<td>{_e(c.verdict)}</td></tr>")
    out.append("</table>")
    return out


def render_html(rows: list, comparisons: Optional[list] = None,
                images: Optional[dict] = None, *, title: str = "Model checks") -> str:
    """The report page. ``images`` maps a test's nodeid to ``[(title, png_bytes), ...]``.

    >>> rows = [{"nodeid": "t.py::test_a", "model": {"parameters": 10}, "results": [
    ...     {"check": "grads_finite", "passed": True, "headline": "expected <finite>",
    ...      "details": "", "metrics": {}}]}]
    >>> page = render_html(rows)
    >>> page.startswith("<!DOCTYPE html>") and "expected &lt;finite&gt;" in page
    True
    """
    rows = sorted(rows, key=lambda r: r["nodeid"])
    images = images or {}
    comps = list(comparisons or [])
    regressed = [c for c in comps if c.verdict == "regressed"]
    regressed_tests = {c.nodeid for c in regressed}
    n_checks = sum(len(r["results"]) for r in rows)
    n_failed = sum(1 for r in rows for x in r["results"] if x["passed"] is False)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f"<p>{len(rows)} model tests, {n_checks} checks, {n_failed} failed.</p>"]
    if comparisons is not None:
        out.append("<h2>Baseline comparison</h2>")
        if regressed:
            out.append(f'<div class="banner bad">{len(regressed)} regression(s) against the'
                       " baseline</div>")
            out += _comparison_table(regressed)
        else:
            out.append('<div class="banner good">no regressions against the baseline</div>')
        unsure = [c for c in comps if c.verdict == "inconclusive"]
        if unsure:
            out.append(f"<p>{len(unsure)} timed metric(s) inconclusive (a change beyond the"
                       " threshold that the samples, the load or the parallelism do not"
                       " establish; not failing):</p>")
            out += _comparison_table(unsure)
        skipped = [c for c in comps if c.verdict == "skipped: other parallelism"]
        if skipped:
            out.append(f"<p>{len(skipped)} timed metric(s) not compared: timed under another"
                       " parallelism (torch threads, xdist workers) than the baseline; save a"
                       " baseline under the same -n / --modelcheck-threads.</p>")
        rest = [c for c in comps if c.verdict not in ("regressed", "inconclusive")]
        if rest:
            out.append("<details><summary>all other compared metrics"
                       f" ({len(rest)})</summary>")
            out += _comparison_table(rest)
            out.append("</details>")
    out.append("<h2>Model health</h2>")
    out += _health_table(rows, regressed_tests)
    for row in rows:
        nodeid = row["nodeid"]
        model = row.get("model") or {}
        out.append(f'<h2 id="{_anchor(nodeid)}">{_e(nodeid)}</h2>')
        facts = [f"outcome: {row.get('outcome', '-')}"]
        if model.get("type"):
            facts.append(f"model: {model['type']}")
        out.append(f"<p>{_e(' · '.join(facts))}</p>")
        mine = [c for c in regressed if c.nodeid == nodeid]
        if mine:
            out.append('<div class="banner bad">regressed: ' + _e(", ".join(
                c.metric for c in mine)) + "</div>")
        plots = []
        for r in row["results"]:
            status = {True: "passed", False: "failed", None: "skipped"}[r["passed"]]
            out.append(f'<div class="check"><h3><span class="{status}">{status.upper()}</span>'
                       f" {_e(r['check'])}</h3>"
                       f'<div class="headline">{_e(r.get("headline", ""))}</div>')
            if r.get("details"):
                out.append(f"<pre>{_e(r['details'])}</pre>")
            out.append("</div>")
            plots += _plots_of(r)
        plots += list(images.get(nodeid, []))
        if plots:
            out.append("<div>" + "".join(_img(t, png) for t, png in plots) + "</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(path: str, rows: list, comparisons: Optional[list] = None,
               images: Optional[dict] = None) -> None:
    """Render the page and write it to ``path`` atomically.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "report.html")
    >>> write_html(p, [])
    >>> os.path.getsize(p) > 0
    True
    """
    from ..core.files import atomic_write_text

    atomic_write_text(path, render_html(rows, comparisons, images))
