"""The HTML report in a real browser: headless Chromium loads it, every image decodes, no
console error, and a screenshot shows the page (loss curves included).

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
