"""report.html rendered in a real browser (headless Chromium): the results table is there and every
plot image decodes to its PNG's size.

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it); where it is absent
the test is skipped and says so.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess

import pytest

pytest.importorskip("matplotlib")

from peftlab.lab import report  # noqa: E402
from peftlab.lab.results import OK, EpochRecord, RunResult, save_study  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (Debian: apt-get install chromium)")

# Runs after the page's load event (data: images decoded by then); writes what the browser saw into the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(img => ({alt: img.alt, complete: img.complete,
                                                 width: img.naturalWidth, height: img.naturalHeight}));
  const table = document.querySelector("table");
  const seen = {images, header: table ? [...table.rows[0].cells].map(c => c.textContent) : null,
                rows: table ? [...table.rows].slice(1).map(r => [...r.cells].map(c => c.textContent)) : null};
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>"""


def _runs() -> list[RunResult]:
    runs = []
    for i, (name, method, params) in enumerate([("full", "full", 22_700_000), ("lora", "lora", 75_000), ("ia3", "ia3", 1_500)]):
        runs.append(RunResult(
            name=name, method=method, status=OK, trainable_params=params, total_params=22_700_000, accuracy=0.79 + 0.01 * i,
            f1=0.8, eval_loss=0.45, train_seconds=50.0 + 10 * i, peak_rss_mb=900.0 + i, adapter_bytes=300_000,
            loss_curve=[[float(s), 0.7 - 0.02 * s] for s in range(1, 11)],
            epochs=[EpochRecord(epoch=1, train_loss=0.6, eval_loss=0.45, accuracy=0.79 + 0.01 * i, f1=0.8, seconds=50.0)],
        ))
    return runs


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _render(page, tmp_path, *flags: str) -> dict:
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
               *flags, "--dump-dom", page.as_uri()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the page's probe did not run (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))


def test_report_renders_its_table_and_every_plot_in_chromium(tmp_path):
    out = tmp_path / "study"
    runs = _runs()
    save_study(str(out), "browser-check", runs)
    outputs = report.build(str(out))
    html = (out / "report.html").read_text(encoding="utf-8")
    page = tmp_path / "probed.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")

    seen = _render(page, tmp_path)

    assert seen["header"] == list(report.columns(runs))
    assert [row[0] for row in seen["rows"]] == ["full", "lora", "ia3"] and all(row[2] == "ok" for row in seen["rows"])
    plots = {title: path for title, path in outputs.items() if path.endswith(".png")}
    # no sweep in these runs, so every plot but the sweep curves is drawn
    assert list(plots) == ["Loss curves", "Accuracy vs trainable parameters", "Accuracy vs training time", "Time and memory"]
    assert [img["alt"] for img in seen["images"]] == list(plots)
    for img in seen["images"]:
        with open(plots[img["alt"]], "rb") as fh:
            expected = _png_size(fh.read())
        assert img["complete"] and (img["width"], img["height"]) == expected and min(expected) > 0, img


def test_a_broken_image_is_caught(tmp_path):
    """The check can fail: a plot whose bytes are not a PNG decodes to nothing."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><table><tr><th>run</th></tr></table>"
                    '<img alt="bad" src="data:image/png;base64,bm90IGEgcG5n">' + PROBE + "</body></html>", encoding="utf-8")
    seen = _render(page, tmp_path)
    assert seen["images"] == [{"alt": "bad", "complete": True, "width": 0, "height": 0}]


# Where each plot and its caption landed on the page (CSS pixels, page coordinates), and the page's height.
LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const box = el => { const r = el.getBoundingClientRect();
                      return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; };
  const figures = [...document.querySelectorAll("figure")].map(f => ({
      alt: f.querySelector("img").alt, img: box(f.querySelector("img")),
      caption: box(f.querySelector("figcaption")), text: f.querySelector("figcaption").textContent}));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({figures, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def _screenshot(page, tmp_path, width: int, height: int):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'shot-profile'}",
               "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}",
               "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return matplotlib.image.imread(str(shot))[..., :3]  # floats in [0, 1], rows x columns x RGB


def test_screenshot_shows_every_plot_with_its_caption_under_it(tmp_path):
    """In a screenshot of the page, each plot is drawn (ink on white: axes, text, lines) at a readable
    size, and its caption (title and one sentence) is rendered right under it."""
    out = tmp_path / "study"
    save_study(str(out), "screenshot-check", _runs())
    report.build(str(out))
    html = (out / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "layout.html"
    probed.write_text(html.replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    width = 1200
    layout = _render(probed, tmp_path, "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},900")
    plain = tmp_path / "plain.html"
    plain.write_text(html, encoding="utf-8")
    height = int(layout["height"]) + 20
    pixels = _screenshot(plain, tmp_path, width, height)
    assert pixels.shape[0] >= layout["height"] and pixels.shape[1] == width

    assert [f["alt"] for f in layout["figures"]] == ["Loss curves", "Accuracy vs trainable parameters",
                                                     "Accuracy vs training time", "Time and memory"]
    for fig in layout["figures"]:
        img, cap = fig["img"], fig["caption"]
        assert img["w"] >= 400 and img["h"] >= 250, fig  # readable, not a thumbnail
        region = pixels[int(img["y"]):int(img["y"] + img["h"]), int(img["x"]):int(img["x"] + img["w"])]
        ink = (region.mean(axis=2) < 0.5).mean()  # dark pixels: axes, ticks, labels, lines
        colour = (region.max(axis=2) - region.min(axis=2) > 0.25).mean()  # coloured pixels: the data
        assert 0.005 < ink < 0.5 and colour > 0.0002, (fig["alt"], ink, colour)  # a few dots of colour at least
        # the caption: title then a sentence, rendered as text right under its plot
        assert fig["text"].startswith(fig["alt"] + ". ") and fig["text"].rstrip().endswith(".") and len(fig["text"]) > 80
        assert 0 <= cap["y"] - (img["y"] + img["h"]) < 40 and cap["h"] >= 14, fig
        text = pixels[int(cap["y"]):int(cap["y"] + cap["h"]), int(cap["x"]):int(cap["x"] + cap["w"])]
        assert (text.mean(axis=2) < 0.8).mean() > 0.03, fig["alt"]  # glyphs (grey, anti-aliased), not an empty box


def test_a_blank_plot_is_caught(tmp_path):
    """The screenshot check can fail: a white image of plot size has no ink."""
    import base64
    import io

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 4), dpi=100)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    page = tmp_path / "blank.html"
    page.write_text(f'<!DOCTYPE html><html><body style="margin:0"><img src="data:image/png;base64,{data}"></body></html>',
                    encoding="utf-8")
    pixels = _screenshot(page, tmp_path, 800, 600)
    region = pixels[0:400, 0:600]
    assert (region.mean(axis=2) < 0.5).mean() < 0.005  # what the test above would reject
