"""The HTML report's structure, without a browser: failed tests first, expected failures
labelled, no mid-word breaks allowed by the stylesheet, a page that shows everything without
JavaScript, and every plot the run made embedded. ``thirty_test_run`` builds the 30-test run
that ``test_html_browser.py`` also renders in headless Chromium.
"""
import base64
import html
import io
import re
from html.parser import HTMLParser

import pytest

from pytest_modelcheck.core.baseline import Baseline, compare
from pytest_modelcheck.core.result import CheckResult
from pytest_modelcheck.report.html import PNG_MAGIC, plots_of, render_html, status_of

FP = {"key": "m"}
LONG = ("tests/models/segmentation/test_unet3d_volumetric_segmentation.py::"
        "test_unet3d_trains_on_synthetic_volumes[batch=4-precision=bf16-channels_last-{}]")


def _png(color, size=(2, 1)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=60)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor(color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _results(i, flops, plot_dir):
    """The check results of test ``i``: some fail, some carry curves and saved plots."""
    losses = [2.3 * (0.8 if i % 7 else 1.6) ** t for t in range(12)]
    out = [CheckResult("grads_finite", True, "expected finite gradients for all 12 trainable"
                       " tensors, observed finite (loss 1.61, grad norm 0.82)"),
           CheckResult("flops_under", True, f"expected <= 10M FLOPs, observed {flops}",
                       metrics={"flops": flops}),
           CheckResult("memory_under", True, "expected a peak <= 64 MiB, observed 3 MiB",
                       metrics={"peak_bytes": (3 + i) * 2 ** 20}, estimated=True),
           CheckResult("throughput_at_least", True, "expected >= 100 samples/s, observed more",
                       metrics={"samples_per_s": 1000.0 + 37 * i}),
           CheckResult("no_host_sync", None, "skipped: device 'cuda' is not available")]
    if i % 5 == 0:
        out[0] = CheckResult("grads_finite", False, "expected finite outputs, loss and gradients,"
                             " observed NaN in the gradient of 'encoder.blocks.3.attention"
                             ".qkv_projection.weight' (Linear 'qkv_projection')",
                             details="parameters with non-finite gradients:\n"
                                     "  encoder.blocks.3.attention.qkv_projection.weight NaN:"
                                     " 12/12 <&>\n" + "  " + "x" * 300)
    if i % 6 == 1:
        out.append(CheckResult("model_overfits", i % 7 != 0, "expected loss <= 0.1 x initial"
                               " 2.3 = 0.23 within 12 steps, observed 0.16 (deterministic run)",
                               metrics={"losses": losses}))
    if i == 4:
        out.append(CheckResult("lr_schedule", True, "expected a cosine schedule, observed one",
                               metrics={"lrs": [0.01 * (1 + __import__("math").cos(t / 3)) / 2
                                                for t in range(10)],
                                        "expected_lrs": [0.01 * (1 + __import__("math").cos(
                                            t / 3)) / 2 for t in range(10)],
                                        "losses": losses[:10]}))
    if i == 8 and plot_dir is not None:
        paths = []
        for name, colour in (("spectrum.png", "#d9822b"), ("weights.png", "#17692b")):
            p = plot_dir / name
            p.write_bytes(_png(colour))
            paths.append(str(p))
        out.append(CheckResult("spectrum_matches", True, "expected band ratios <= 2, observed"
                               " 1.3", metrics={"plots": paths}))
    return out


def thirty_test_run(plot_dir=None):
    """``(rows, comparisons)`` of a 30-test run: 6 with failed checks, 1 expected failure,
    1 unexpected pass, 4 regressions (FLOPs grew), long parametrized node ids, loss curves,
    a learning-rate schedule and two saved plots (when ``plot_dir`` is given)."""
    def rows(bump):
        out = []
        for i in range(30):
            nodeid = (LONG.format(f"variant{i:02d}") if i % 3 == 0
                      else f"tests/test_models.py::test_model_{i:02d}")
            flops = 2_000_000 + 1000 * i + (400_000 if bump and i % 7 == 2 else 0)
            results = [r.to_dict() for r in _results(i, flops, plot_dir if bump else None)]
            failed = any(r["passed"] is False for r in results)
            row = {"nodeid": nodeid, "outcome": "failed" if failed else "passed",
                   "model": {"parameters": 1_000 * (i + 1) ** 3, "type": f"Net{i % 4}"},
                   "results": results}
            if i == 10:
                row.update(outcome="skipped", xfail={"outcome": "xfailed", "strict": False,
                                                      "reason": "known NaN in the attention softmax"})
            if i == 11:
                row.update(outcome="passed", xfail="was flaky on bf16")
            out.append(row)
        return out
    new = rows(True)
    return new, compare(Baseline.from_rows(rows(False), FP), new, FP)


class _Page(HTMLParser):
    """The parsed page: its tags, health/comparison rows, test sections, images, scripts."""

    def __init__(self, page):
        super().__init__()
        self.tags, self.rows, self.sections, self.imgs, self.scripts = [], [], [], [], []
        self._in_tbody = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "tbody":
            self._in_tbody = True
        if tag == "tr" and self._in_tbody:
            self.rows.append(attrs)
        if tag == "details" and "test" in attrs.get("class", ""):
            self.sections.append(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "script":
            self.scripts.append(attrs)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = False


_parse = _Page


def _health_rows(page):
    table = re.search(r'<table class="health".*?</table>', page, re.S).group(0)
    return re.findall(r"<tr class=\"([^\"]*)\"[^>]*><td[^>]*><a [^>]*href=\"#([^\"]+)\">", table)


def test_failed_first_then_unexpected_passes_regressions_and_expected_failures(tmp_path):
    rows, comps = thirty_test_run(tmp_path)
    page = render_html(rows, comps)
    classes = [cls.split()[0] for cls, _ in _health_rows(page)]
    assert len(classes) == 30
    # 6 tests with failed checks, then the unexpected pass, then the 4 regressed tests that
    # passed, then the expected failure, then the rest
    assert classes[:6] == ["failed"] * 6 and classes[6] == "xpassed", classes
    regressed = {c.nodeid for c in comps if c.verdict == "regressed"}
    assert len(regressed) == 4
    regressed_next = [cls for cls, _ in _health_rows(page)][7:7 + 4]
    assert all(cls == "passed regressed" for cls in regressed_next), regressed_next
    assert classes[11] == "xfailed" and set(classes[12:]) == {"passed"}
    # the sections follow the table's order
    anchors = [a for _, a in _health_rows(page)]
    assert [s["id"] for s in _parse(page).sections] == anchors


def test_xfail_and_xpass_are_labelled_where_the_data_says_so(tmp_path):
    rows, comps = thirty_test_run()
    page = render_html(rows, comps)
    assert '<span class="badge xfailed">XFAILED</span>' in page
    assert "expected to fail: known NaN in the attention softmax" in page
    assert '<span class="badge xpassed">XPASSED</span>' in page
    assert "passed unexpectedly: was flaky on bf16" in page
    assert "<p>30 model tests (6 failed, 1 xpassed, 1 xfailed), 156 checks, 6 failed (1 as expected)." in page


@pytest.mark.parametrize("row, status", [
    ({"outcome": "xfailed"}, "xfailed"),
    ({"outcome": "xpassed"}, "xpassed"),
    ({"outcome": "skipped", "xfail": "why"}, "xfailed"),
    ({"outcome": "skipped", "wasxfail": "why"}, "xfailed"),
    ({"outcome": "passed", "xfail": {"reason": "r", "strict": False}}, "xpassed"),
    ({"outcome": "failed", "xfail": True}, "failed"),     # strict xpass: pytest fails it
    ({"outcome": "skipped"}, "skipped"),
    ({"outcome": "passed"}, "passed"),
    ({"outcome": "failed"}, "failed"),
    ({}, "passed"),
    ({"results": [{"passed": False}]}, "failed"),
])
def test_status_is_read_defensively(row, status):
    assert status_of({"nodeid": "t::a", "results": [], **row}) == status


def _rules(page):
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    return re.findall(r"([^{}]+)\{([^{}]*)\}", css.replace("\n", ""))


def test_stylesheet_breaks_no_word_in_cells_and_scrolls_tables_in_their_own_box():
    page = render_html(*thirty_test_run())
    rules = _rules(page)
    anywhere = [sel.strip() for sel, body in rules if "overflow-wrap:anywhere" in body]
    assert anywhere == [".id"]                       # node ids and metric paths only
    assert not [sel for sel, body in rules if "word-break:break-all" in body
                or "word-break:break-word" in body]
    cell = dict(rules)["th,td"]
    assert "word-break:normal" in cell and "overflow-wrap:normal" in cell
    assert "overflow-x:auto" in dict(rules)[".scroll"]
    # every table sits in a horizontally scrollable box
    assert page.count("<table") == page.count('<div class="scroll"><table') >= 2
    assert "@media (max-width:640px)" in page       # the health table stacks on a phone
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    # ids may wrap after separators instead of mid-word
    assert "tests/<wbr>models/<wbr>segmentation/<wbr>test_<wbr>unet3d_<wbr>volumetric_" in page


def test_without_javascript_everything_is_shown(tmp_path):
    rows, comps = thirty_test_run(tmp_path)
    page = render_html(rows, comps)
    no_js = re.sub(r"<script>.*?</script>", "", page, flags=re.S)
    parsed = _parse(no_js)
    assert len(parsed.sections) == 30
    assert all("open" in s for s in parsed.sections)          # every section open
    assert len(_health_rows(no_js)) == 30
    assert not [attrs for _, attrs in parsed.tags if "hidden" in attrs
                and attrs.get("id") != "toolbar"]            # only the JS toolbar is hidden
    for row in rows:
        for r in row["results"]:
            assert html.escape(r["headline"], quote=True) in no_js.replace("<wbr>", "").replace(
                '<span class="id">', "").replace("</span>", "")
    # the script closes only the sections that need no attention
    quiet = [s["id"] for s in parsed.sections if "data-quiet" in s]
    loud = [s for s in parsed.sections if "data-quiet" not in s]
    assert len(quiet) == 30 - 6 - 1 - 4 and len(loud) == 11
    assert all(re.search(r"\b(failed|xpassed|regressed)\b", s["class"]) for s in loud)


def test_self_contained_with_inline_script_only(tmp_path):
    page = render_html(*thirty_test_run(tmp_path))
    parsed = _parse(page)
    assert parsed.scripts == [{}]                            # one inline script, no src
    assert not [t for t, _ in parsed.tags if t in ("link", "iframe", "object", "embed")]
    urls = [v for _, attrs in parsed.tags for k, v in attrs.items()
            if k in ("src", "href", "action", "data", "poster")]
    assert urls and all(u.startswith(("data:image/png;base64,", "#")) for u in urls)
    assert "default-src 'none'" in page and "url(" not in page and "@import" not in page


def test_every_plot_the_run_made_is_embedded(tmp_path):
    rows, comps = thirty_test_run(tmp_path)
    page = render_html(rows, comps)
    imgs = _parse(page).imgs
    alts = [i["alt"] for i in imgs]
    assert "spectrum_matches: spectrum.png" in alts and "spectrum_matches: weights.png" in alts
    assert "lr_schedule: learning rate per step" in alts
    assert alts.count("model_overfits: loss per step") == 5
    for img in imgs:
        assert base64.b64decode(img["src"].split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    embedded = {base64.b64decode(i["src"].split(",", 1)[1]) for i in imgs}
    assert (tmp_path / "spectrum.png").read_bytes() in embedded


def test_saved_plots_plot_and_plots_and_a_missing_one(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png("red"))
    b.write_bytes(_png("blue"))
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    result = {"check": "c", "metrics": {"plot": str(a), "plots": [str(b), str(a)],
                                        "residual_png": str(tmp_path / "gone.png"),
                                        "other": [str(tmp_path / "not.png")],
                                        "lrs": [0.1, 0.05]}}
    plots, notes = plots_of(result)
    assert [t for t, _ in plots] == ["c: a.png", "c: b.png"]  # no lr curve: a saved plot exists
    assert [p for _, p in plots] == [a.read_bytes(), b.read_bytes()]
    assert notes == [f"c: plot {tmp_path / 'not.png'} not a PNG file",
                     f"c: plot {tmp_path / 'gone.png'} not readable (No such file or directory)"]
    row = {"nodeid": "t::a", "outcome": "passed", "results": [{**result, "passed": True,
                                                               "headline": "h"}]}
    page = render_html([row])
    assert page.count("<img") == 2 and page.count('class="missing"') == 2


def test_sort_keys_are_the_raw_numbers(tmp_path):
    rows, comps = thirty_test_run()
    page = render_html(rows, comps)
    row = re.search(r'<tr class="passed"[^>]*>.*?</tr>', page, re.S).group(0)
    values = re.findall(r'data-v="([^"]*)"', row)
    assert len(values) == 5 and all(float(v) >= 0 for v in values)
    bare = render_html([{"nodeid": "t::a", "results": []}])
    assert 'data-label="params" data-v=""' in bare           # absent: sorted last
