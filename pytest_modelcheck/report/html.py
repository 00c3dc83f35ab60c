"""The ``--modelcheck-html`` report: one self-contained HTML page.

Inline CSS and a small inline script, no network (a Content-Security-Policy forbids every
external resource): plots are PNGs embedded as base64 ``data:`` URIs, so the file can be
attached to a CI run and opened anywhere. The page has the regressions against a baseline
(highlighted), a health table (failed tests first; sortable and filterable with JavaScript)
and a collapsible section per model test with each check's headline, details and every plot
the run made: loss curves and learning-rate schedules drawn from the recorded metrics, and the
PNGs a check saved (``metrics["plot"]``, ``metrics["plots"]``, any other metric naming a
``.png`` file). Without JavaScript everything is shown, all sections open.

Words are never broken inside table cells (``word-break: normal``; cells are at least as wide
as their longest word and wide tables scroll inside their own box); only node ids and metric
paths may wrap, preferably after ``/``, ``::``, ``_``, ``-``, ``.``. On a phone the health
table stacks its cells and the page never scrolls sideways.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
from typing import Any, Optional

from .markdown import comparison_cells
from .terminal import health_row, xfail_outcome

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: A saved plot larger than this is named, not embedded.
MAX_EMBEDDED_BYTES = 20 * 2 ** 20

#: Test statuses, in the order the page lists them: those that need attention first.
STATUSES = ("failed", "xpassed", "xfailed", "skipped", "passed")

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline';"
        " script-src 'unsafe-inline'")

_CSS = """
*,*::before,*::after{box-sizing:border-box}
[hidden]{display:none!important}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;padding:1.5em 2em;
color:#222;max-width:1280px;line-height:1.4;word-break:normal;overflow-wrap:break-word}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:.2em 0}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}
table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top;
word-break:normal;overflow-wrap:normal}
th{background:#f3f3f3;white-space:nowrap}
th button{font:inherit;font-weight:600;border:0;background:none;padding:0;cursor:pointer;color:inherit}
th[aria-sort=ascending] button::after{content:" \\25B2"}
th[aria-sort=descending] button::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.id{overflow-wrap:anywhere;word-break:normal}
.w{display:block;min-width:16em}.w.metric{min-width:11em}
tr.regressed td,tr.failed td,tr.xpassed td{background:#fde2e1}tr.improved td{background:#e3f6e5}
tr.inconclusive td{background:#fff4d6}tr.skipped-other td{color:#666}
tr.xfailed td,tr.skipped td{color:#555}
span.passed{color:#17692b;font-weight:600}span.failed{color:#b3261e;font-weight:600}
span.skipped{color:#777;font-weight:600}span.xfailed{color:#8a5a00;font-weight:600}
span.xpassed{color:#8e24aa;font-weight:600}
.badge{display:inline-block;padding:0 .4em;border:1px solid currentColor;border-radius:3px;
font-size:.8em;margin-right:.4em;white-space:nowrap}
pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.85em;margin:.3em 0 .8em;
white-space:pre;overflow-wrap:normal}
details.test{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:0 .8em}
details.test.failed,details.test.xpassed,details.test.regressed{border-color:#b3261e}
details.test>summary{cursor:pointer;padding:.5em 0;font-weight:600}
.check{margin:.4em 0 .8em}.headline{font-family:ui-monospace,monospace;font-size:.9em}
figure{display:inline-block;margin:.5em 1em .5em 0;max-width:100%;vertical-align:top}
figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee}
.banner{padding:.6em 1em;border-radius:4px;margin:.5em 0}
.banner.bad{background:#fde2e1;border:1px solid #b3261e}
.banner.good{background:#e3f6e5;border:1px solid #17692b}
.toolbar{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin:.5em 0}
.toolbar input{font:inherit;padding:.2em .4em;min-width:0;flex:1 1 14em;max-width:30em}
.toolbar button{font:inherit}
.missing{color:#b3261e}
@media (max-width:640px){
body{padding:.8em}
table.health thead{display:none}
table.health,table.health tbody,table.health tr,table.health td{display:block;width:auto}
table.health tr{border:1px solid #ccc;margin:.5em 0}
table.health td{border:0;padding:.15em .5em;text-align:left;white-space:normal}
table.health td[data-label]::before{content:attr(data-label) ": ";font-weight:600}
table.health .w{min-width:0}
}
"""

# Runs last in <body>. Collapses the sections that need no attention, opens the one a link
# points at, and wires the toolbar (filter, expand/collapse) and the sortable table headers.
_JS = """
(function () {
  var d = document, each = function (xs, f) { Array.prototype.forEach.call(xs, f); };
  var sections = d.querySelectorAll("details.test"), table = d.getElementById("health");
  each(sections, function (s) { if (s.hasAttribute("data-quiet")) s.open = false; });
  function openHash() {
    var t = location.hash && d.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (t && t.tagName === "DETAILS") t.open = true;
  }
  window.addEventListener("hashchange", openHash);
  openHash();
  var bar = d.getElementById("toolbar");
  if (!bar || !table) return;
  bar.hidden = false;
  var input = d.getElementById("filter"), shown = d.getElementById("shown");
  input.addEventListener("input", function () {
    var q = input.value.trim().toLowerCase(), n = 0;
    each(table.tBodies[0].rows, function (r) {
      r.hidden = q !== "" && r.getAttribute("data-key").indexOf(q) < 0;
      if (!r.hidden) n += 1;
    });
    each(sections, function (s) {
      s.hidden = q !== "" && s.getAttribute("data-key").indexOf(q) < 0;
    });
    shown.textContent = q ? n + " of " + sections.length + " tests shown" : "";
  });
  d.getElementById("expand").addEventListener("click", function () {
    each(sections, function (s) { s.open = true; });
  });
  d.getElementById("collapse").addEventListener("click", function () {
    each(sections, function (s) { s.open = false; });
  });
  function key(cell) {
    var v = cell.getAttribute("data-v");
    if (v === "") return null;
    return v === null ? cell.textContent.toLowerCase() : parseFloat(v);
  }
  var heads = table.tHead.rows[0].cells;
  each(heads, function (th, i) {
    var b = d.createElement("button");
    b.type = "button";
    b.textContent = th.textContent;
    th.textContent = "";
    th.appendChild(b);
    b.addEventListener("click", function () {
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      each(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      var body = table.tBodies[0];
      Array.prototype.map.call(body.rows, function (r, j) { return [key(r.cells[i]), j, r]; })
        .sort(function (a, b) {
          if (a[0] === null || b[0] === null) {
            return a[0] === b[0] ? a[1] - b[1] : (a[0] === null ? 1 : -1);
          }
          var c = typeof a[0] === "number" && typeof b[0] === "number" ? a[0] - b[0]
            : String(a[0]).localeCompare(String(b[0]));
          return c ? dir * c : a[1] - b[1];
        })
        .forEach(function (t) { body.appendChild(t[2]); });
    });
  });
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_ID_BREAK = re.compile(r"(?<=::)|(?<=[/_.,=-])(?=.)|(?=\[)")


def _id(text: object) -> str:
    """A node id or metric path, escaped, with ``<wbr>`` after ``/``, ``::``, ``_``, ``-``,
    ``.``, ``,``, ``=`` and before ``[``: where a long id may wrap without breaking a word.

    >>> _id("t/a_b.py::c[<x>]")
    't/<wbr>a_<wbr>b.<wbr>py::<wbr>c<wbr>[&lt;x&gt;]'
    """
    return "<wbr>".join(_e(part) for part in _ID_BREAK.split(str(text)) if part)


def _prose(text: object) -> str:
    """Escaped text whose long tokens (module paths, file paths, ids: over 30 characters) may
    wrap at their separators (see :func:`_id`) and, if a part is still wider than the line,
    anywhere in it (class ``id``); other words never break.

    >>> print(_prose("NaN in 'encoder.blocks.3.attention.qkv_proj.weight' <x>"))
    NaN in <span class="id">&#x27;encoder.<wbr>blocks.<wbr>3.<wbr>attention.<wbr>qkv_<wbr>proj.<wbr>weight&#x27;</span> &lt;x&gt;
    """
    return "".join(f'<span class="id">{_id(tok)}</span>' if len(tok) > 30 else _e(tok)
                   for tok in re.split(r"(\s+)", str(text)) if tok)


def _anchor(nodeid: str) -> str:
    """A unique HTML id for a test: its readable form plus a short hash of the exact id."""
    import hashlib

    readable = "".join(c if c.isascii() and c.isalnum() else "-" for c in nodeid)[:80]
    return f"t-{readable}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


def _finite_points(values: Any) -> list:
    if not isinstance(values, list):
        return []
    return [(i, float(v)) for i, v in enumerate(values)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def curve_png(series: list, title: str, ylabel: str) -> Optional[bytes]:
    """A PNG of one or more per-step curves, ``series`` being ``[(label, values), ...]`` (log
    scale when every value is positive and they span more than 20 x). Non-finite values are
    left out; None without matplotlib or without a curve of two points.

    >>> png = curve_png([("observed", [0.1, 0.05]), ("expected", [0.1, 0.05])], "lr", "lr")
    >>> png[:8] == PNG_MAGIC, curve_png([("x", [1.0])], "t", "y")
    (True, None)
    """
    curves = [(label, _finite_points(values)) for label, values in series]
    curves = [(label, pts) for label, pts in curves if len(pts) >= 2]
    if not curves:
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
    colours = ("#1f5fa8", "#d9822b", "#17692b")
    for n, (label, pts) in enumerate(curves):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=colours[n % 3], linewidth=1.4, label=label,
                linestyle="-" if n == 0 else "--")
    every = [y for _, pts in curves for _, y in pts]
    if min(every) > 0 and max(every) / min(every) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_curve_png(losses: list, title: str = "loss") -> Optional[bytes]:
    """A PNG of a loss curve (log scale when positive), or None without matplotlib or points.

    >>> loss_curve_png([1.0, 0.5, 0.25])[:8] == PNG_MAGIC
    True
    """
    return curve_png([("loss", losses)], title, "loss")


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(title)}</figcaption></figure>")


def _png_paths(metrics: dict) -> list:
    """Every PNG path a result's metrics name: ``plot``, ``plots`` (paths, or dicts with a
    ``path``), then any other metric whose value (or list item) is a ``.png`` path; no repeats.

    >>> _png_paths({"plot": "a.png", "plots": ["b.png", {"path": "a.png"}], "spectrum": "c.PNG",
    ...             "note": "x.txt"})
    ['a.png', 'b.png', 'c.PNG']
    """
    keys = ["plot", "plots"] + sorted(k for k in metrics if k not in ("plot", "plots"))
    found: list = []
    for key in keys:
        value = metrics.get(key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, dict):
                item = item.get("path")
            if isinstance(item, str) and item.lower().endswith(".png") and item not in found:
                found.append(item)
    return found


def _read_png(path: str) -> tuple:
    """``(png bytes, None)``, or ``(None, why not)``."""
    try:
        if os.path.getsize(path) > MAX_EMBEDDED_BYTES:
            return None, f"larger than {MAX_EMBEDDED_BYTES >> 20} MiB, not embedded"
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return None, f"not readable ({exc.strerror or type(exc).__name__})"
    return (data, None) if data.startswith(PNG_MAGIC) else (None, "not a PNG file")


def plots_of(result: dict) -> tuple:
    """``([(title, png), ...], [note, ...])`` for one check result: its loss curve, its
    learning-rate schedule (when no saved plot shows it) and every saved PNG its metrics name;
    a note for each named PNG that cannot be embedded. A saved PNG is captioned with
    ``metrics["plot_title"]`` (for ``plot``) or the ``title`` of a ``plots`` entry, else its file
    name.

    >>> plots, notes = plots_of({"check": "c", "metrics": {"losses": [1.0, 0.5],
    ...                          "plot": "/nonexistent/p.png"}})
    >>> [title for title, _ in plots], notes
    (['c: loss per step'], ['c: plot /nonexistent/p.png not readable (No such file or directory)'])
    """
    out, notes = [], []
    check = result.get("check", "?")
    metrics = result.get("metrics") or {}
    png = loss_curve_png(metrics.get("losses") or [], f"{check}: loss per step")
    if png:
        out.append((f"{check}: loss per step", png))
    saved = _png_paths(metrics)
    if not saved and isinstance(metrics.get("lrs"), list):
        png = curve_png([("observed lr", metrics["lrs"]),
                         ("expected lr", metrics.get("expected_lrs") or [])],
                        f"{check}: learning rate per step", "learning rate")
        if png:
            out.append((f"{check}: learning rate per step", png))
    titles = {p.get("path"): p.get("title") for p in metrics.get("plots") or []
              if isinstance(p, dict)}
    if isinstance(metrics.get("plot"), str):
        titles[metrics["plot"]] = metrics.get("plot_title")
    for path in saved:
        data, why = _read_png(path)
        if data is None:
            notes.append(f"{check}: plot {path} {why}")
        else:
            title = titles.get(path)
            if not (isinstance(title, str) and title):
                title = os.path.basename(path)
            out.append((f"{check}: {title}", data))
    return out, notes


def status_of(row: dict) -> str:
    """What happened to a test: 'failed', 'xpassed', 'xfailed', 'skipped' or 'passed'. An
    expected failure is read from an ``xfail`` entry ``{"outcome": "xfailed"|"xpassed", ...}``,
    from an ``outcome`` of 'xfailed'/'xpassed', or from an ``xfail`` (or ``wasxfail``) reason
    beside pytest's outcome ('skipped' when it failed as expected, 'passed' when it passed
    unexpectedly); without an outcome, a failed check fails the test.

    >>> status_of({"outcome": "passed", "xfail": {"outcome": "xpassed", "reason": ""}})
    'xpassed'
    >>> status_of({"outcome": "skipped", "xfail": "known NaN"}), status_of({"results": [
    ...     {"passed": False}]})
    ('xfailed', 'failed')
    """
    if xfail_outcome(row):
        return xfail_outcome(row)
    outcome = str(row.get("outcome") or "").lower()
    if outcome in ("xfailed", "xfail"):
        return "xfailed"
    if outcome in ("xpassed", "xpass"):
        return "xpassed"
    if row.get("xfail") or row.get("wasxfail"):
        if outcome == "skipped":
            return "xfailed"
        if outcome == "passed":
            return "xpassed"
    if outcome in ("failed", "error"):
        return "failed"
    if outcome == "skipped":
        return "skipped"
    if any(r.get("passed") is False for r in row.get("results") or []):
        return "failed"
    return "passed"


def _xfail_reason(row: dict) -> str:
    for key in ("xfail", "wasxfail", "xfail_reason"):
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and value.get("reason"):
            return str(value["reason"])
    return ""


def _order(rows: list, regressed_tests: set) -> list:
    """Rows in page order: failed, unexpectedly passed, regressed, expected failures,
    skipped, passed; by node id within each."""
    def rank(row: dict) -> tuple:
        status = status_of(row)
        regressed = row["nodeid"] in regressed_tests and status not in ("failed", "xpassed")
        return (STATUSES.index(status) if not regressed else 1.5, row["nodeid"])
    return sorted(rows, key=rank)


def _key(row: dict, status: str, regressed: bool) -> str:
    """The text the filter matches: node id, status, model type, failed checks."""
    failed = [r.get("check", "") for r in row["results"] if r.get("passed") is False]
    words = [row["nodeid"], status, (row.get("model") or {}).get("type") or "", *failed]
    return _e(" ".join(str(w) for w in words + (["regressed"] if regressed else [])).lower())


def _number(row: dict, check: str, key: str) -> str:
    """A sort key attribute value: the raw number, or '' when absent."""
    if check == "model":
        value = (row.get("model") or {}).get(key)
    else:
        value = next((r.get("metrics", {}).get(key) for r in row["results"]
                      if r.get("check") == check and key in (r.get("metrics") or {})), None)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    return repr(float(value)) if math.isfinite(value) else ""


def _health_table(rows: list, regressed_tests: set) -> list:
    heads = ["test", "status", "params", "peak memory", "throughput", "checks passed",
             "failed checks"]
    out = ['<div class="scroll"><table class="health" id="health"><thead><tr>'
           + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>"]
    for row in rows:
        c, status = health_row(row), status_of(row)
        regressed = row["nodeid"] in regressed_tests
        results = row["results"]
        passed = sum(1 for r in results if r.get("passed") is True)
        ratio = repr(passed / len(results)) if results else ""
        failing = [r.get("check", "?") for r in results if r.get("passed") is False]
        failed_cell = ((f"expected: {', '.join(failing)}" if status == "xfailed"
                        else ", ".join(failing)) or "-")
        cls = " ".join([status] + (["regressed"] if regressed else []))
        label = status.upper() + (" · regressed" if regressed else "")
        out.append(
            f'<tr class="{cls}" data-key="{_key(row, status, regressed)}">'
            f'<td class="id" data-label="test"><a class="w" href="#{_anchor(row["nodeid"])}">'
            f'{_id(c["test"])}</a></td>'
            f'<td data-label="status" data-v="{STATUSES.index(status)}">'
            f'<span class="{status}">{_e(label)}</span></td>'
            f'<td class="num" data-label="params" data-v="{_number(row, "model", "parameters")}">'
            f'{_e(c["params"])}</td>'
            f'<td class="num" data-label="peak memory" '
            f'data-v="{_number(row, "memory_under", "peak_bytes")}">{_e(c["peak"])}</td>'
            f'<td class="num" data-label="throughput" '
            f'data-v="{_number(row, "throughput_at_least", "samples_per_s")}">'
            f'{_e(c["throughput"])}</td>'
            f'<td data-label="checks passed" data-v="{ratio}">{_e(c["checks"])}</td>'
            f'<td data-label="failed checks">{_e(failed_cell)}</td></tr>')
    out.append("</tbody></table></div>")
    return out


def _comparison_table(comps: list) -> list:
    heads = ["test", "metric", "old", "new", "change", "kind", "how", "verdict"]
    classes = ["id", "id metric", "num", "num", "num", "", "how", ""]
    out = ['<div class="scroll"><table class="comparison"><thead><tr>'
           + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>"]
    for c in comps:
        cells = comparison_cells(c) + [c.verdict]
        cls = c.verdict if c.verdict in ("regressed", "improved", "inconclusive") else (
            "skipped-other" if c.verdict.startswith("skipped") else "")
        out.append(f'<tr class="{cls}">' + "".join(
            f'<td{f" class={chr(34)}{k}{chr(34)}" if k else ""}>'
            + (f'<span class="w{" metric" if i else ""}">{_id(v)}</span>' if i < 2 else _prose(v))
            + "</td>"
            for i, (k, v) in enumerate(zip(classes, cells))) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _baseline_section(comps: list) -> list:
    regressed = [c for c in comps if c.verdict == "regressed"]
    out = ["<h2>Baseline comparison</h2>"]
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
        out.append(f"<details><summary>all other compared metrics ({len(rest)})</summary>")
        out += _comparison_table(rest)
        out.append("</details>")
    return out


def _test_section(row: dict, regressed: list, images: list) -> list:
    """One test's collapsible section: open in the markup (the script closes the quiet ones)."""
    nodeid, model = row["nodeid"], row.get("model") or {}
    status, results = status_of(row), row["results"]
    passed = sum(1 for r in results if r.get("passed") is True)
    quiet = status in ("passed", "skipped", "xfailed") and not regressed
    cls = " ".join(["test", status] + (["regressed"] if regressed else []))
    out = [f'<details class="{cls}" id="{_anchor(nodeid)}" open'
           f'{" data-quiet" if quiet else ""} data-key="{_key(row, status, bool(regressed))}">'
           f'<summary><span class="badge {status}">{status.upper()}</span>'
           + ('<span class="badge failed">REGRESSED</span>' if regressed else "")
           + f'<span class="id">{_id(nodeid)}</span> '
           f'<span class="count">({passed}/{len(results)} checks passed)</span></summary>']
    facts = [f"outcome: {row.get('outcome', '-')}"]
    if status in ("xfailed", "xpassed"):
        reason = _xfail_reason(row)
        strict = isinstance(row.get("xfail"), dict) and row["xfail"].get("strict")
        facts.append(("expected to fail" if status == "xfailed" else "passed unexpectedly")
                     + (" (strict: the test fails)" if strict and status == "xpassed" else "")
                     + (f": {reason}" if reason else ""))
    if model.get("type"):
        facts.append(f"model: {model['type']}")
    out.append(f"<p>{_prose(' · '.join(facts))}</p>")
    if regressed:
        out.append('<div class="banner bad">regressed: '
                   + ", ".join(_id(c.metric) for c in regressed) + "</div>")
    plots, notes = [], []
    for r in results:
        st = {True: "passed", False: "failed", None: "skipped"}.get(r.get("passed"), "skipped")
        out.append(f'<div class="check"><h3><span class="{st}">{st.upper()}</span>'
                   f" {_e(r.get('check', '?'))}</h3>"
                   f'<div class="headline">{_prose(r.get("headline", ""))}</div>')
        if r.get("details"):
            out.append(f"<pre>{_e(r['details'])}</pre>")
        out.append("</div>")
        got, why = plots_of(r)
        plots += got
        notes += why
    plots += list(images)
    if plots:
        out.append("<div>" + "".join(_img(t, png) for t, png in plots) + "</div>")
    out += [f'<p class="missing">{_prose(n)}</p>' for n in notes]
    out.append("</details>")
    return out


def _summary_line(rows: list) -> str:
    counts = {s: 0 for s in STATUSES}
    for row in rows:
        counts[status_of(row)] += 1
    n_checks = sum(len(r["results"]) for r in rows)
    failed = [status_of(r) == "xfailed" for r in rows for x in r["results"]
              if x.get("passed") is False]
    tests = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] and s != "passed")
    expected = f" ({sum(failed)} as expected)" if any(failed) else ""
    return (f"<p>{len(rows)} model tests{f' ({tests})' if tests else ''}, {n_checks} checks,"
            f" {len(failed) - sum(failed)} failed{expected}.</p>")


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
    images = images or {}
    comps = list(comparisons or [])
    regressed = [c for c in comps if c.verdict == "regressed"]
    regressed_tests = {c.nodeid for c in regressed}
    rows = _order(rows, regressed_tests)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>", _summary_line(rows)]
    if comparisons is not None:
        out += _baseline_section(comps)
    out.append("<h2>Model health</h2>")
    out.append('<div class="toolbar" id="toolbar" hidden><input type="search" id="filter"'
               ' placeholder="filter: test id, status, check" aria-label="filter tests">'
               '<button type="button" id="expand">expand all</button>'
               '<button type="button" id="collapse">collapse all</button>'
               '<span id="shown"></span></div>')
    out += _health_table(rows, regressed_tests)
    out.append("<h2>Tests</h2>")
    for row in rows:
        mine = [c for c in regressed if c.nodeid == row["nodeid"]]
        out += _test_section(row, mine, images.get(row["nodeid"], []))
    out.append(f"<script>{_JS}</script></body></html>")
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
