"""Plots without the internet: the page of the real `dvc plots show`, opened in headless Chromium with every network
request blocked, must draw its charts with the repository's template (and does not with DVC's default, which loads
vega from a CDN); the model card's PNGs are real images.

Chromium is Debian's package (`apt-get install -y chromium`, which .ci/run does); without it these tests fail.
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stages.results.plots import REPO, SELECTION, TEMPLATE, render_card_plots, selection_spec, template_html

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}
# No request leaves the browser: every host name fails to resolve, and everything else (IP literals, loopback
# included) goes to a proxy on the discard port, where nothing listens. So a CDN script cannot load even on a
# machine that has the internet, as on the GPU clusters this page is for.
OFFLINE = ["--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]

LOSS = {"seq2seq": [(0, 3.0), (5, 1.5), (10, 0.7)], "vlm": [(0, 4.0), (5, 2.5), (10, 0.9), (15, 0.4)]}
SCORES = [("bleu / vlm", 98.2), ("bleu / vlm_untrained", 0.0), ("attribute_accuracy / vlm", 99.1),
          ("attribute_accuracy / vlm_untrained", 33.0)]
CIDER = [("cider_d / vlm", 981.0), ("cider_d / vlm_untrained", 2.0)]
EVALUATIONS = {"seq2seq": [(5, 1.2), (10, 0.8)], "vlm": [(5, 2.0), (10, 0.6), (15, 0.7)]}   # vlm keeps step 10
PLOTS = """plots:
  - Training loss:
      template: linear
      x: step
      y:
        seq2seq.tsv: loss
        vlm.tsv: loss
  - Test metrics:
      template: bar_horizontal
      x: score
      y:
        comparison.csv: entry
"""
PLOT_IDS = ("Training_loss", "Test_metrics")   # the ids of DVC's <div>s: the plot names, spaces made underscores


def write_inputs(root: Path, loss_dir: str = "", eval_dir: str = "") -> None:
    """dvclive's train/loss.tsv per model and evaluate's comparison tables, under the given folders of root."""
    for model, points in LOSS.items():
        path = root / loss_dir.format(model=model) / (f"{model}.tsv" if not loss_dir else "loss.tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\tloss\n" + "".join(f"{step}\t{loss}\n" for step, loss in points))
    for model, points in EVALUATIONS.items():   # what LiveCallback writes: each evaluation, and the kept one
        folder = root / f"dvclive/train_{model}/plots/custom"
        folder.mkdir(parents=True, exist_ok=True)
        step, score = min(points, key=lambda point: point[1])
        (folder / "evaluations.json").write_text(json.dumps([{"step": s, "score": v} for s, v in points]))
        kept = {"step": step, "score": score, "metric": "loss", "keep": "best"}
        (folder / "kept.json").write_text(json.dumps([kept]))
    (root / eval_dir).mkdir(parents=True, exist_ok=True)
    for name, rows in (("comparison.csv", SCORES), ("cider_d.csv", CIDER)):
        (root / eval_dir / name).write_text("entry,score\n" + "".join(f"{e},{s}\n" for e, s in rows))


def run(cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def plots_page(folder: Path, offline_template: bool) -> Path:
    """A new git + DVC repository with two plots, rendered by the real `dvc plots show`; with offline_template, it
    gets the plots.html_template setting of this repository's .dvc/config and the file it names."""
    folder.mkdir()
    run(folder, "git", "init", "-q")
    run(folder, sys.executable, "-m", "dvc", "init", "-q")
    write_inputs(folder)
    (folder / "dvc.yaml").write_text(PLOTS)
    if offline_template:
        setting = run(REPO, sys.executable, "-m", "dvc", "config", "--project", "plots.html_template").strip()
        assert (REPO / ".dvc" / setting).resolve() == TEMPLATE, f"plots.html_template is {setting!r}"
        (folder / ".dvc" / setting).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEMPLATE, folder / ".dvc" / setting)
        run(folder, sys.executable, "-m", "dvc", "config", "plots.html_template", setting)
    run(folder, sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots")
    return folder / "dvc_plots/index.html"


def browse(page: Path, profile: Path, *flags: str) -> str:
    """The DOM of page after its scripts ran (5 s of virtual time: vega renders asynchronously)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed; on Debian or Ubuntu: apt-get update && apt-get install -y chromium "
                    "(.ci/run does this before `make test`)")
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", f"--user-data-dir={profile}", *flags, "--virtual-time-budget=5000",
                             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed:\n{result.stderr[-3000:]}"
    return result.stdout


class Marks(HTMLParser):
    """Per plot <div>: how many vega views (an svg or canvas of class "marks") are in it, and the aria-label of each
    item it drew by kind ("line mark", "bar", ...): vega's SVG renderer labels every data mark with its fields."""

    def __init__(self, dom: str):
        super().__init__()
        self.current, self.views, self.items = None, Counter(), {}
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "id" in attrs:   # DVC's plot <div>s are siblings; vega's own <div>s carry no id
            self.current = attrs["id"]
            self.items.setdefault(self.current, {})
        elif self.current is None:
            return
        if tag in ("svg", "canvas") and "marks" in (attrs.get("class") or "").split():
            self.views[self.current] += 1
        if "aria-roledescription" in attrs:
            self.items[self.current].setdefault(attrs["aria-roledescription"], []).append(attrs.get("aria-label"))


def test_plots_draw_offline_with_the_repository_template(tmp_path):
    page = plots_page(tmp_path / "repo", offline_template=True)
    html = page.read_text()
    assert "<script src=" not in html, "the page still loads a script from elsewhere"
    marks = Marks(browse(page, tmp_path / "profile", *OFFLINE))
    for plot in PLOT_IDS:
        assert marks.views[plot] == 1, f"no vega view drew in plot {plot}"
    # Every input drew: a line per TSV (DVC's template draws each twice, the second faded for its hover highlight)
    # and a bar per row of the CSV.
    lines = {label.rsplit("filename: ", 1)[-1] for label in marks.items["Training_loss"]["line mark"]}
    assert lines == {f"{model}.tsv" for model in LOSS}
    bars = [label.split("; ")[1] for label in marks.items["Test_metrics"]["bar"]]
    assert sorted(bars) == sorted(f"entry: {entry}" for entry, _ in SCORES)


def test_plots_do_not_draw_offline_with_dvc_default_template(tmp_path):
    """The check above is not vacuous: DVC's own page, which loads vega from a CDN, draws nothing in the same
    browser."""
    page = plots_page(tmp_path / "repo", offline_template=False)
    assert "cdn.jsdelivr.net/npm/vega" in page.read_text()
    marks = Marks(browse(page, tmp_path / "profile", *OFFLINE))
    assert set(PLOT_IDS) <= set(marks.items)
    assert not marks.views and not any(marks.items[plot] for plot in PLOT_IDS)


def test_browser_flags_block_even_loopback(tmp_path):
    """The blocking flags are what keep a CDN out where there is internet: a script served on this machine runs
    without them and does not with them."""
    (tmp_path / "canary.js").write_text('document.body.setAttribute("data-canary", "ran");')
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = tmp_path / "page.html"
        page.write_text(f'<html><body><script src="http://127.0.0.1:{server.server_port}/canary.js"></script>'
                        "</body></html>")
        assert 'data-canary="ran"' in browse(page, tmp_path / "online")
        assert 'data-canary="ran"' not in browse(page, tmp_path / "offline", *OFFLINE)
    finally:
        server.shutdown()
        server.server_close()


def test_committed_template_is_what_the_pinned_package_generates():
    # Hashes, not the texts: a failing comparison of two ~1 MB one-line scripts would print them whole.
    expected = hashlib.sha256(template_html().encode()).hexdigest()
    assert hashlib.sha256(TEMPLATE.read_bytes()).hexdigest() == expected, (
        f"{TEMPLATE.relative_to(REPO)} is stale (vl-convert-python changed?): run `python -m stages.results.plots`")


def test_card_plots_are_png_images(tmp_path):
    write_inputs(tmp_path, loss_dir="dvclive/train_{model}/plots/metrics/train", eval_dir="eval")
    written = render_card_plots(tmp_path / "card", root=tmp_path)
    assert [p.name for p in written] == ["training_loss.png", "selection.png", "comparison.png", "cider_d.png"]
    for path in written:
        png = path.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 400 and height >= 150 and len(png) > 10_000, (path.name, width, height, len(png))


def test_card_plots_need_their_inputs(tmp_path):
    write_inputs(tmp_path, loss_dir="dvclive/train_{model}/plots/metrics/train", eval_dir="eval")
    (tmp_path / "eval/comparison.csv").unlink()
    with pytest.raises(FileNotFoundError, match="comparison.csv"):
        render_card_plots(tmp_path / "card", root=tmp_path)


def test_the_selection_plot_draws_each_evaluation_and_marks_the_kept_step(tmp_path):
    write_inputs(tmp_path, loss_dir="dvclive/train_{model}/plots/metrics/train", eval_dir="eval")
    spec = selection_spec({model: {name: tmp_path / path for name, path in paths.items()}
                           for model, paths in SELECTION.items()})
    lines, kept = (layer["data"]["values"] for layer in spec["layer"])
    assert len(lines) == 5 and {point["model"] for point in lines} == {"seq2seq (loss)", "vlm (loss)"}
    assert kept == [{"model": "seq2seq (loss)", "step": 10, "score": 0.8},
                    {"model": "vlm (loss)", "step": 10, "score": 0.6}]
