"""The HTML report in a real browser: headless Chromium loads it, every image decodes, no
console error, and a screenshot shows the page (loss curves included). A 30-test run with
failures and regressions is measured at 1280 and 390 CSS px, with and without JavaScript: no
word broken across lines, no horizontal overflow (see
``test_no_broken_words_and_no_horizontal_overflow``), the filter, sort, collapse and links
work, and screenshots at both widths are saved under the test's ``tmp_path`` (copied to
``$MODELCHECK_KEEP_SCREENSHOTS`` when set).

Skipped when Chromium is not installed (``apt-get install -y chromium``).
"""
import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from pytest_modelcheck.report.html import loss_curve_png, write_html

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.path.isfile(p) and os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed"
                                " (/usr/bin/chromium; apt-get install -y chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

# Put first in <head>: records errors (script errors and resources that fail to load, seen in
# the capture phase) and console.error/warn calls; on load, writes the state of every image
# into the DOM, which --dump-dom then prints.
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t.tagName ? "failed to load <" + t.tagName.toLowerCase() + ">"
                               : String(e.message));
  }, true);
  ["error", "warn"].forEach(function (level) {
    var orig = console[level];
    console[level] = function () {
      errors.push("console." + level + ": " + Array.prototype.join.call(arguments, " "));
      return orig.apply(console, arguments);
    };
  });
  window.addEventListener("load", function () {
    var imgs = Array.prototype.map.call(document.images, function (img) {
      return {alt: img.alt, complete: img.complete, width: img.naturalWidth,
              height: img.naturalHeight, shown: img.getBoundingClientRect().width};
    });
    var out = document.createElement("pre");
    out.id = "browser-probe";
    out.textContent = JSON.stringify({images: imgs, errors: errors});
    document.body.appendChild(out);
  });
})();
</script>"""


def _rows():
    # A short overfit curve and a grad-norm run, as the checks record them.
    losses = [2.3 * 0.8 ** t for t in range(30)]
    return [
        {"nodeid": "tests/test_models.py::test_mlp_trains", "outcome": "passed",
         "model": {"type": "MLP", "parameters": 4_485},
         "results": [
             {"check": "model_overfits", "passed": True,
              "headline": "expected loss <= 0.1 x initial 2.3 = 0.23 within 30 steps,"
                          " observed 0.0029", "details": "loss curve (30 steps): ...",
              "metrics": {"losses": losses, "initial_loss": 2.3}},
             {"check": "grad_norms_stable", "passed": True,
              "headline": "expected gradient norms within 100 x, observed at most 1.4 x",
              "details": "", "metrics": {"grad_norms": [1.0, 1.2, 1.4, 1.1],
                                         "losses": [1.0, 0.9, 0.7, 0.6]}},
             {"check": "throughput_at_least", "passed": True,
              "headline": "expected inference throughput >= 100 samples/s, observed 9.1k"
                          " samples/s", "details": "",
              "metrics": {"samples_per_s": 9100.0, "times_s": [0.0017, 0.0018]}}]},
        {"nodeid": "tests/test_models.py::test_unet_diverges[lr=1]", "outcome": "failed",
         "model": {"type": "UNet", "parameters": 1_234_567},
         "results": [
             {"check": "model_overfits", "passed": False,
              "headline": "expected loss <= 0.1 x initial 1.1 = 0.11 within 20 steps,"
                          " observed a non-finite loss: nan at step 7 <&>",
              "details": "hints:\n  - lower the learning rate",
              "metrics": {"losses": [1.1, 1.5, 3.0, 9.0, 40.0, 300.0, 5e4, "nan"]}},
             {"check": "memory_under", "passed": None, "headline": "skipped: CPU only",
              "details": "", "metrics": {}}]},
    ]


def _chromium(*args, tmp_path, timeout=120):
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _probe(html_path, tmp_path):
    """Load a copy of the page with the probe and return (probe result, chromium stderr)."""
    page = html_path.read_text(encoding="utf-8")
    probed = tmp_path / ("probed-" + html_path.name)
    probed.write_text(page.replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE, 1),
                      encoding="utf-8")
    proc = _chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri(),
                     tmp_path=tmp_path)
    found = re.search(r'<pre id="browser-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the probe did not run; DOM:\n{proc.stdout[:2000]}\n{proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1))), proc.stderr


def _console_errors(stderr):
    # Chromium logs page console messages as "...:CONSOLE..." lines; JS errors say "Uncaught".
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and ("ERROR" in line.split(":CONSOLE")[0] or "Uncaught" in line
                                       or "error" in line.lower())]


def test_report_renders_every_image_without_errors(tmp_path):
    extra = loss_curve_png([5.0, 4.0, 3.5, 3.3], "extra: validation loss")
    report = tmp_path / "report.html"
    write_html(str(report), _rows(),
               images={"tests/test_models.py::test_mlp_trains": [("validation loss", extra)]})
    result, stderr = _probe(report, tmp_path)
    images = result["images"]
    # model_overfits (2 tests) + grad_norms_stable curves, plus the one extra image
    assert len(images) == 4, images
    for img in images:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
        # loss_curve_png: 5.0 x 2.6 inches at 100 dpi
        assert (img["width"], img["height"]) == (500, 260), img
        assert img["shown"] > 0, img
    assert result["errors"] == []
    assert _console_errors(stderr) == []


def test_the_probe_catches_a_broken_image(tmp_path):
    # The negative control: a data URI that is not a PNG must show up as broken.
    report = tmp_path / "broken.html"
    write_html(str(report), _rows()[:1])
    page = report.read_text(encoding="utf-8")
    bad = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()
    page = re.sub(r'src="data:image/png;base64,[^"]+"', f'src="data:image/png;base64,{bad}"', page,
                  count=1)
    report.write_text(page, encoding="utf-8")
    result, _ = _probe(report, tmp_path)
    widths = [img["width"] for img in result["images"]]
    assert widths.count(0) == 1 and len(widths) == 2, result
    assert "failed to load <img>" in result["errors"]


def test_screenshot_shows_the_page_and_its_plots(tmp_path):
    report = tmp_path / "report.html"
    write_html(str(report), _rows())
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--virtual-time-budget=5000",
              report.as_uri(), tmp_path=tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, len(data)     # a blank 1280x2000 page compresses to ~10 kB
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.shape[:2] == (2000, 1280)
    rgb = (pixels[..., :3] * 255).round().astype(int)
    assert len({tuple(p) for p in rgb[::7, ::7].reshape(-1, 3).tolist()}) > 50   # not blank
    # the loss curves' line colour #1f5fa8 = (31, 95, 168) is on screen
    line = (abs(rgb - [31, 95, 168]).sum(axis=-1) <= 12).sum()
    assert line > 200, line


# -- layout of a 30-test run at desktop and phone widths ------------------------------------
#
# Headless Chromium will not lay a window out narrower than 500 CSS px, so each page is shown
# in an <iframe srcdoc> of the exact width (the iframe is the page's viewport: media queries,
# innerWidth and scrollWidth are the iframe's). A srcdoc frame shares the host page's origin,
# so the host's script reads the report's layout directly; a frame with
# sandbox="allow-same-origin" (no allow-scripts) shows the page as a browser without
# JavaScript would.
MEASURE = r"""
function measure(frame) {
  var win = frame.contentWindow, doc = frame.contentDocument, each = Array.prototype.forEach;
  var res = {width: win.innerWidth, scrollWidth: doc.documentElement.scrollWidth,
             broken: [], idBreaks: 0, words: 0, overflowingCells: [], cellStyles: [],
             cells: 0};
  var walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT), word = /[\p{L}\p{N}]{2,}/gu;
  for (var n = walker.nextNode(); n; n = walker.nextNode()) {
    var el = n.parentElement;
    if (el.closest("pre,script,style") || !el.getClientRects().length) continue;
    word.lastIndex = 0;
    for (var m = word.exec(n.data); m; m = word.exec(n.data)) {
      res.words += 1;
      var range = doc.createRange();
      range.setStart(n, m.index);
      range.setEnd(n, m.index + m[0].length);
      var rects = Array.prototype.filter.call(range.getClientRects(),
                                              function (r) { return r.width > 0; });
      var tops = rects.map(function (r) { return r.top; });
      if (rects.length < 2 || Math.max.apply(null, tops) - Math.min.apply(null, tops) < 2) continue;
      var box = el.closest("td,th,summary,figcaption,p,div,h1,h2,h3,body");
      if (el.closest(".id")) res.idBreaks += 1;
      res.broken.push({word: m[0], in: box.tagName, text: box.textContent.slice(0, 100),
                       boxWidth: box.clientWidth});
    }
  }
  each.call(doc.querySelectorAll("td,th"), function (c) {
    if (!c.getClientRects().length) return;
    res.cells += 1;
    if (c.scrollWidth > c.clientWidth + 1) res.overflowingCells.push(c.textContent.slice(0, 80));
    var cs = win.getComputedStyle(c);
    if (cs.wordBreak !== "normal" || (cs.overflowWrap === "anywhere" && !c.classList.contains("id")))
      res.cellStyles.push(c.textContent.slice(0, 40) + ": " + cs.wordBreak + "/" + cs.overflowWrap);
  });
  var bar = doc.getElementById("toolbar"), sections = doc.querySelectorAll("details.test");
  res.toolbarShown = !!(bar && bar.getClientRects().length);
  res.open = Array.prototype.map.call(sections, function (s) { return [s.id, s.open]; });
  res.rowsShown = Array.prototype.filter.call(doc.querySelectorAll("#health tbody tr"),
                                              function (r) { return r.getClientRects().length; }).length;
  return res;
}
function interact(frame, done) {
  var win = frame.contentWindow, doc = frame.contentDocument, out = {};
  var rows = function () { return Array.prototype.slice.call(doc.querySelectorAll("#health tbody tr")); };
  var shown = function (xs) { return xs.filter(function (x) { return x.getClientRects().length; }).length; };
  var sections = function () { return Array.prototype.slice.call(doc.querySelectorAll("details.test")); };
  var input = doc.getElementById("filter");
  input.value = "UNet3D";
  input.dispatchEvent(new win.Event("input"));
  out.filtered = [shown(rows()), shown(sections()), doc.getElementById("shown").textContent];
  input.value = "";
  input.dispatchEvent(new win.Event("input"));
  out.unfiltered = [shown(rows()), shown(sections())];
  var params = function () { return rows().map(function (r) { return parseFloat(r.cells[2].getAttribute("data-v")); }); };
  var button = doc.querySelectorAll("#health thead th")[2].querySelector("button");
  button.click();
  out.ascending = params();
  button.click();
  out.descending = params();
  doc.getElementById("expand").click();
  out.expanded = sections().filter(function (s) { return s.open; }).length;
  doc.getElementById("collapse").click();
  out.collapsed = sections().filter(function (s) { return s.open; }).length;
  var target = sections()[sections().length - 1];
  win.location.hash = "#" + target.id;
  setTimeout(function () { out.hashOpened = target.open; done(out); }, 50);
}
window.addEventListener("load", function () {
  setTimeout(function () {
    var result = {};
    var frames = document.querySelectorAll("iframe");
    Array.prototype.forEach.call(frames, function (f) { result[f.id] = measure(f); });
    interact(document.getElementById("desktop-js"), function (out) {
      result.interactions = out;
      Array.prototype.forEach.call(frames, function (f) { f.remove(); });
      var pre = document.createElement("pre");
      pre.id = "measure";
      pre.textContent = JSON.stringify(result);
      document.body.appendChild(pre);
    });
  }, 50);
});
"""


def _host(frames, script=""):
    """A host page of iframes: ``frames`` is ``[(id, width, height, page, scripts), ...]``."""
    import html

    tags = "".join(
        f'<iframe id="{fid}" style="display:block;border:0;width:{w}px;height:{h}px"'
        f'{"" if js else " sandbox=allow-same-origin"} srcdoc="{html.escape(page, quote=True)}">'
        f"</iframe>" for fid, w, h, page, js in frames)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{{margin:0}}</style>'
            f"</head><body>{tags}<script>{script}</script></body></html>")


# The planted bug: the old stylesheet let any cell break anywhere, so a table squeezed into a
# narrow page broke words ('regresse d'), and a page wider than a phone overflowed it.
BUGGY_CELLS = ("<style>th,td{overflow-wrap:anywhere!important}"
               ".w{display:inline!important;min-width:0!important}</style>")
BUGGY_WIDTH = "<style>body{min-width:600px}</style>"


@pytest.fixture(scope="module")
def thirty(tmp_path_factory):
    try:
        from test_html_report import thirty_test_run
    except ImportError:  # --import-mode=importlib: load the sibling module by path
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_html_report_data", os.path.join(os.path.dirname(__file__), "test_html_report.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        thirty_test_run = module.thirty_test_run
    from pytest_modelcheck.report.html import render_html

    plots = tmp_path_factory.mktemp("plots")
    rows, comps = thirty_test_run(plots)
    return rows, comps, render_html(rows, comps)


@pytest.fixture(scope="module")
def measured(thirty, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    rows, comps, page = thirty
    buggy = page.replace("</head>", BUGGY_CELLS + "</head>", 1)
    wide = page.replace("</head>", BUGGY_WIDTH + "</head>", 1)
    host = tmp / "host.html"
    host.write_text(_host([("desktop-js", 1280, 2000, page, True),
                           ("phone-js", 390, 2000, page, True),
                           ("desktop-nojs", 1280, 2000, page, False),
                           ("phone-nojs", 390, 2000, page, False),
                           ("phone-buggy-cells", 390, 2000, buggy, False),
                           ("phone-buggy-width", 390, 2000, wide, False)], MEASURE),
                    encoding="utf-8")
    proc = _chromium("--window-size=1300,2000", "--virtual-time-budget=10000", "--dump-dom",
                     host.as_uri(), tmp_path=tmp)
    found = re.search(r'<pre id="measure">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the measurement did not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("frame", ["desktop-js", "phone-js", "desktop-nojs", "phone-nojs"])
def test_no_broken_words_and_no_horizontal_overflow(measured, frame):
    """The 30-test report (6 failed tests, 4 regressions, long parametrized ids) at 1280 and
    390 CSS px, with and without JavaScript, measured in headless Chromium:

    * horizontal overflow: the document's ``scrollWidth`` against the viewport's
      ``innerWidth`` (a wide table scrolls inside its own box, which does not count), and each
      shown cell's ``scrollWidth`` against its ``clientWidth`` (nothing sticks out of a cell);
    * broken words: every run of two or more letters or digits in every shown text node
      (``<pre>`` blocks scroll instead of wrapping and are left out) is wrapped in a ``Range``;
      ``Range.getClientRects()`` gives one box per line the run occupies, so boxes at two
      heights mean the word was split across lines. Breaks between runs (at spaces, ``/``,
      ``_``, ``-``, ``.``; node ids carry ``<wbr>`` there, which splits text nodes) are allowed;
      every split inside a run counts, node ids included (their ``overflow-wrap: anywhere`` is
      a last resort for a part longer than a whole line, which this run does not have; a table
      column squeezed so narrow that an id part does not fit would be caught);
    * every shown cell computes ``word-break: normal`` and only id cells ``anywhere``.

    The planted-bug frames (``test_the_measurement_catches_...``) show that the same
    measurement reports broken words and overflow where they happen.
    """
    m = measured[frame]
    width = 1280 if frame.startswith("desktop") else 390
    assert m["width"] == width, m["width"]
    assert m["scrollWidth"] <= m["width"], m["scrollWidth"]
    assert m["words"] > (3000 if frame.endswith("nojs") else 800), m["words"]
    assert m["cells"] > 200, m["cells"]
    assert m["broken"] == [], m["broken"][:10]
    assert m["overflowingCells"] == [], m["overflowingCells"][:10]
    assert m["cellStyles"] == [], m["cellStyles"][:10]


def test_the_measurement_catches_broken_words_and_overflow(measured):
    # negative controls: the old cell style breaks words such as 'regressed' and
    # 'deterministic' mid-word at phone width; a page wider than the phone overflows it
    broken = {b["word"] for b in measured["phone-buggy-cells"]["broken"]}
    assert {"regressed", "deterministic"} & broken, sorted(broken)[:20]
    # and node ids squeezed into a narrow column ('seg men tati on')
    assert {"segmentation", "volumetric"} & broken, sorted(broken)[:20]
    wide = measured["phone-buggy-width"]
    assert wide["scrollWidth"] > wide["width"] == 390


def test_without_javascript_all_is_shown_and_with_it_quiet_tests_collapse(measured, thirty):
    from pytest_modelcheck.report.html import status_of

    rows, comps, _ = thirty
    regressed = {c.nodeid for c in comps if c.verdict == "regressed"}
    loud = sum(1 for r in rows if status_of(r) in ("failed", "xpassed") or r["nodeid"] in regressed)
    for frame in ("desktop-nojs", "phone-nojs"):
        m = measured[frame]
        assert not m["toolbarShown"] and m["rowsShown"] == 30
        assert all(is_open for _, is_open in m["open"]) and len(m["open"]) == 30
    for frame in ("desktop-js", "phone-js"):
        m = measured[frame]
        assert m["toolbarShown"] and m["rowsShown"] == 30
        assert sum(is_open for _, is_open in m["open"]) == loud == 11
        assert [is_open for _, is_open in m["open"]] == [True] * 11 + [False] * 19


def test_filter_sort_collapse_and_links_work(measured):
    got = measured["interactions"]
    # 'UNet3D' (any case) matches the 10 long parametrized ids
    assert got["filtered"] == [10, 10, "10 of 30 tests shown"]
    assert got["unfiltered"] == [30, 30]
    assert got["ascending"] == sorted(got["ascending"]) and len(set(got["ascending"])) == 30
    assert got["descending"] == sorted(got["ascending"], reverse=True)
    assert (got["expanded"], got["collapsed"]) == (30, 0)
    assert got["hashOpened"] is True     # a link to a closed section opens it


@pytest.mark.parametrize("width", [1280, 390])
def test_screenshots_of_the_thirty_test_run(thirty, tmp_path, width):
    """Screenshots at 1280 and 390 px (the latter through a 390 px iframe, see MEASURE)."""
    _, _, page = thirty
    host = tmp_path / "host.html"
    host.write_text(_host([("shot", width, 2000, page, True)]), encoding="utf-8")
    shot = tmp_path / f"report-{width}.png"
    _chromium(f"--screenshot={shot}", f"--window-size={width},2000",
              "--virtual-time-budget=5000", host.as_uri(), tmp_path=tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, len(data)
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.shape[:2] == (2000, width)
    rgb = (pixels[..., :3] * 255).round().astype(int)
    assert len({tuple(p) for p in rgb[::5, ::5].reshape(-1, 3).tolist()}) > 50   # not blank
    # the failed rows' background #fde2e1 = (253, 226, 225) is on screen
    assert (abs(rgb - [253, 226, 225]).sum(axis=-1) <= 6).sum() > 2000
    if os.environ.get("MODELCHECK_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["MODELCHECK_KEEP_SCREENSHOTS"])


def test_seed_pipeline_plots_show_in_the_browser(tmp_path):
    """The figures of attention_maps (vit3d), discriminator_scales (pix2pixcc_gan), mode_sweep
    and no_aliasing (fno), made by the checks themselves on the example models, are embedded
    with their captions and decode in Chromium."""
    import dataclasses

    import torch

    from example_models import fno, pix2pixcc_gan, vit3d
    from pytest_modelcheck.checks import (attention_maps, discriminator_scales, mode_sweep,
                                          no_aliasing)

    torch.manual_seed(0)
    runs = {
        "example_models/test_vit3d.py::test_vit3d_health": [attention_maps(
            plot=str(tmp_path / "attn.png"), model=vit3d.build_model(depth=2),
            batch=vit3d.make_batch(2))],
        "example_models/test_pix2pixcc_gan.py::test_pix2pixcc_discriminator_scales_and_pairs": [
            discriminator_scales(discriminator="discriminator", pairs=pix2pixcc_gan.make_pairs,
                                 plot=str(tmp_path / "scales.png"),
                                 model=pix2pixcc_gan.build_model(),
                                 batch=pix2pixcc_gan.make_batch(2))],
        "example_models/test_fno.py::test_fno_default_checks": [
            mode_sweep((2, 4, 8), plot=str(tmp_path / "sweep.png"), model=fno.build_model(),
                       batch=fno.make_batch(2)),
            no_aliasing(scale=2, plot=str(tmp_path / "alias.png"), model=fno.build_model(),
                        batch=fno.make_batch(2))],
    }
    rows = [{"nodeid": nodeid, "outcome": "passed", "model": {},
             "results": [dataclasses.asdict(r) for r in results]}
            for nodeid, results in runs.items()]
    for row in rows:
        for r in row["results"]:
            assert r["passed"] is True, r["headline"]
            assert r["metrics"]["plot"].endswith(".png"), r["check"]
    report = tmp_path / "report.html"
    write_html(str(report), rows)
    result, stderr = _probe(report, tmp_path)
    shown = {img["alt"]: img for img in result["images"]}
    for caption in ("attention_maps: attention per layer and head (batch mean)",
                    "discriminator_scales: discriminator output per scale, real vs generated",
                    "mode_sweep: relative L2 over the kept Fourier modes",
                    "no_aliasing: output power spectrum on the example and the finer grid"):
        assert caption in shown, sorted(shown)
        img = shown[caption]
        assert img["complete"] and img["width"] > 100 and img["height"] > 100, img
    assert not result["errors"] and not _console_errors(stderr)
