"""Markdown job summary and self-contained HTML report."""
import base64
import io
from html.parser import HTMLParser

import pytest

from pytest_modelcheck.core.baseline import Baseline, compare
from pytest_modelcheck.core.result import CheckResult
from pytest_modelcheck.report.html import PNG_MAGIC, loss_curve_png, render_html, write_html
from pytest_modelcheck.report.markdown import render_markdown, write_markdown

FP = {"key": "m"}


def _rows(flops=2000, headline="expected finite gradients, observed finite"):
    a = [CheckResult("grads_finite", True, headline, details="line 1\n<b>line 2</b>"),
         CheckResult("flops_under", True, "expected <= 1M FLOPs, observed 2k",
                     metrics={"flops": flops}),
         CheckResult("model_overfits", True, "expected loss <= 0.3, observed 0.01",
                     metrics={"losses": [2.0, 1.0, 0.5, "nan", 0.1, 0.01]}),
         CheckResult("memory_under", True, "ok", metrics={"peak_bytes": 3 * 2 ** 20},
                     estimated=True),
         CheckResult("no_host_sync", None, "skipped: no CUDA")]
    b = [CheckResult("grads_finite", False, "expected finite gradients, observed NaN in 'fc.w'")]
    return [{"nodeid": "tests/test_m.py::test_b[x|y]", "outcome": "failed",
             "model": {"parameters": 5, "type": "B"}, "results": [r.to_dict() for r in b]},
            {"nodeid": "tests/test_m.py::test_a", "outcome": "passed",
             "model": {"parameters": 1_500_000, "type": "A"},
             "results": [r.to_dict() for r in a]}]


def _comparisons(new_flops=2200):
    base = Baseline.from_rows(_rows(), FP)
    return compare(base, _rows(flops=new_flops), FP)


def test_markdown_regressions_first_then_health():
    md = render_markdown(_rows(), _comparisons())
    lines = md.splitlines()
    assert lines[0] == "## Model checks"
    assert "2 model tests, 6 checks, 1 failed." in lines
    reg = lines.index("### :x: 1 regression against the baseline")
    health = lines.index("### Model health")
    assert lines[health + 2].startswith("| test | params | peak memory | throughput |")
    assert reg < health
    # 2000 -> 2200 FLOPs: +10%
    assert (r"| tests/test_m.py::test_a | flops_under.flops | 2.00k | 2.20k | +10.0% |"
            r" count | exact |") in lines
    assert (r"| tests/test_m.py::test_a | 1.50M | 3.00 MiB~ | - | 4/5 \(1 skipped\) | - |"
            in lines)
    # the pipe (and the brackets) in the parametrize id are escaped: the table keeps its columns
    assert (r"| tests/test_m.py::test_b\[x\|y\] | 5 | - | - | 0/1 | grads_finite |"
            in lines)


def test_markdown_without_regressions_and_without_baseline():
    md = render_markdown(_rows(), _comparisons(new_flops=2000))
    assert "### :white_check_mark: no regressions against the baseline" in md
    assert "baseline" not in render_markdown(_rows())


def test_write_markdown_append(tmp_path):
    p = tmp_path / "summary.md"
    write_markdown(str(p), "first\n")
    write_markdown(str(p), render_markdown(_rows()), append=True)
    assert p.read_text().startswith("first\n## Model checks\n")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.imgs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "img":
            self.imgs.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page):
    p = _Page()
    p.feed(page)
    p.close()
    return p


def _png(color):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor(color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_html_is_self_contained_and_embeds_pngs():
    extra = _png("red")
    page = render_html(_rows(), _comparisons(),
                       images={"tests/test_m.py::test_a": [("residuals", extra)]})
    parsed = _parse(page)
    # the page's own inline script only (an inline script has no src; no <link>)
    assert parsed.tags.count("script") == 1 and "link" not in parsed.tags
    assert not [u for u in parsed.urls if u.lower().startswith(("http:", "https:", "//"))]
    # the loss curve of model_overfits and the extra image
    assert len(parsed.imgs) == 2
    decoded = []
    for src in parsed.imgs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_MAGIC)
        decoded.append(data)
    assert extra in decoded
    text = "".join(parsed.text)
    assert "1 regression(s) against the baseline" in text
    assert "expected <= 1M FLOPs, observed 2k" in text  # unescaped back by the parser
    assert "<b>line 2</b>" in text  # details are text, not markup
    assert 'class="regressed"' in page


def test_html_escapes_script_in_headline(tmp_path):
    rows = _rows(headline="expected x, observed <script>alert(1)</script>")
    page = render_html(rows)
    assert page.count("<script") == 1          # the page's own inline script, not the data's
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = _parse(page)
    assert parsed.tags.count("script") == 1
    path = tmp_path / "out" / "report.html"
    write_html(str(path), rows)
    assert path.read_text(encoding="utf-8") == page


def test_loss_curve_png_needs_two_finite_points():
    assert loss_curve_png([1.0]) is None
    assert loss_curve_png(["nan", 1.0]) is None
    png = loss_curve_png([1.0, float("inf"), 0.5, 0.2])
    assert png.startswith(PNG_MAGIC)


@pytest.mark.parametrize("comparisons", [None, []])
def test_html_without_comparisons(comparisons):
    page = render_html(_rows(), comparisons)
    assert ("Baseline comparison" in page) == (comparisons is not None)


HOSTILE_ID = ("tests/test_m.py::test_c[`rm -rf`-[click](https://e.com/x)-![i](https://e.com/p.png)"
              "-https://e.com-www.e.com-**b**-$x$-a\\b]")


def _rendered_cells(md):
    """The HTML of a markdown document as CommonMark with GFM tables renders it."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable("table").render(md)


def test_markdown_test_ids_never_become_code_links_or_images():
    rows = [{"nodeid": HOSTILE_ID, "outcome": "failed", "model": {"parameters": 5},
             "results": [{"check": "grads_finite", "passed": False, "metrics": {}}]}]
    md = render_markdown(rows)
    line = next(x for x in md.splitlines() if "test_c" in x)
    # every character that starts markup is escaped, and so are the bare links GitHub makes
    assert "\\`rm -rf\\`" in line and "\\[click\\]\\(https\\://e.com/x\\)" in line
    assert "!\\[i\\]" in line and "www\\.e.com" in line and "\\$x\\$" in line
    assert "a\\\\b" in line and line.count(" | ") == 5  # the table keeps its six columns
    page = _rendered_cells(md)
    for tag in ("<a ", "<code>", "<img", "<strong>", "<em>"):
        assert tag not in page, tag
    parsed = _parse(page)
    assert HOSTILE_ID in "".join(parsed.text)  # shown exactly as written


def test_markdown_measured_memory_is_not_labelled_timed():
    from pytest_modelcheck.core.baseline import Comparison

    c = Comparison("t::a", "memory_under.peak_bytes", "timed", 1000, 1100, 0.1, "regressed",
                   "single measurement, tolerance 5%")
    md = render_markdown(_rows(), [c])
    line = next(x for x in md.splitlines() if x.startswith("| t::a | memory_under"))
    cells = [x.strip() for x in line.strip("|").split(" | ")]
    assert cells[2:] == ["1000 B", "1.07 KiB", "+10.0%", "memory \\(measured\\)",
                         "single measurement, tolerance 5%"]
    assert "timed" not in line


def _kind_of(metric, kind="deterministic", old=1, new=2):
    from pytest_modelcheck.core.baseline import Comparison
    from pytest_modelcheck.report.markdown import comparison_cells

    return comparison_cells(Comparison("t::a", metric, kind, old, new, None, "regressed"))[5]


def test_markdown_metric_kinds_say_what_the_metric_is():
    assert _kind_of("memory_under.peak_bytes") == "memory (estimated)"
    assert _kind_of("memory_under.peak_bytes", "timed") == "memory (measured)"
    assert _kind_of("flops_under.flops") == "count"
    assert _kind_of("model.parameters") == "count"
    assert _kind_of("no_host_sync.ops") == "op count"
    assert _kind_of("no_host_sync.count") == "host syncs"
    assert _kind_of("throughput_at_least.times_s", "timed", [0.1], [0.2]) == "time"


def test_markdown_op_count_change_is_worded_as_an_op_count():
    from pytest_modelcheck.core.baseline import Comparison

    c = Comparison("t::a", "no_host_sync.ops", "deterministic", 120, 140, 1 / 6, "regressed",
                   "exact")
    md = render_markdown(_rows(), [c])
    line = next(x for x in md.splitlines() if x.startswith("| t::a |"))
    assert ("| t::a | no_host_sync.ops \\(dispatched ops: op count, not host syncs\\) | 120 |"
            " 140 | +16.7% | op count | exact |") == line


def test_markdown_cells_escape_every_markup_character():
    nodeid = "t.py::test_x[`a`|b-[x](y)-*s*_u_<i>\nz]"
    rows = [{"nodeid": nodeid, "model": {"parameters": 5},
             "results": [{"check": "grads_finite", "passed": True, "metrics": {}}]}]
    md = render_markdown(rows)
    line = next(x for x in md.splitlines() if "test" in x and "x" in x and x.startswith("| t"))
    assert ("| t.py::test_x\\[\\`a\\`\\|b-\\[x\\]\\(y\\)-\\*s\\*\\_u\\_&lt;i&gt; z\\] |"
            in line)
    assert line.count(" | ") == 5
    page = _rendered_cells(md)
    for tag in ("<a ", "<code>", "<em>", "<strong>", "<i>"):
        assert tag not in page, tag
    assert nodeid.replace("\n", " ") in "".join(_parse(page).text)


def test_markdown_xfail_is_not_counted_as_a_failure():
    bad = {"check": "grads_finite", "passed": False, "metrics": {}}
    good = {"check": "grads_finite", "passed": True, "metrics": {}}
    rows = [{"nodeid": "t.py::test_x", "outcome": "skipped", "results": [bad],
             "xfail": {"outcome": "xfailed", "reason": "known NaN", "strict": False}},
            {"nodeid": "t.py::test_y", "outcome": "passed", "results": [good],
             "xfail": {"outcome": "xpassed", "reason": "", "strict": False}},
            {"nodeid": "t.py::test_z", "outcome": "failed", "results": [bad]}]
    md = render_markdown(rows)
    assert ("3 model tests, 3 checks, 1 failed, 1 failed as expected (xfail), 1 test passed"
            " though marked xfail (xpass).") in md
    lines = md.splitlines()
    assert ("| t.py::test_x | - | - | - | 0/1 \\(xfail\\) | xfail \\(expected failure: known"
            " NaN\\): grads_finite |") in lines
    assert ("| t.py::test_y | - | - | - | 1/1 \\(xpass\\) | XPASS: marked xfail, but passed |"
            in lines)
    assert "| t.py::test_z | - | - | - | 0/1 | grads_finite |" in lines


def test_reports_follow_a_symlink(tmp_path):
    target = tmp_path / "real" / "summary.md"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "summary.md"
    link.symlink_to(target)
    write_markdown(str(link), "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "summary.md"]
