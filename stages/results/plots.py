"""Plots that need no internet: the HTML template of `dvc plots show` with vega, vega-lite and vega-embed inlined, and
PNGs of the key plots for the model card.

DVC's default page loads the three scripts from a CDN, so on a machine without internet (many GPU clusters) it shows
nothing. `.dvc/config` points `plots.html_template` at TEMPLATE instead, a committed file that this module writes from
the JavaScript bundle of the pinned vl-convert-python wheel; tests/test_plots.py checks that it is up to date, so a
version bump of that package must be followed by `python -m stages.results.plots`.
"""
import csv
import json
from pathlib import Path

import vl_convert

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / ".dvc/plots/offline.html"   # `.dvc/config` names it relative to .dvc/, as DVC reads it

# dvc_render 1.0.2 writes Vega-Lite v5 specs ($schema .../vega-lite/v5.json); vl-convert's default is the newest
# Vega-Lite (v6), so the bundle and the card plots use the newest v5 it ships, the same major as the specs.
VL_VERSION = "5.21"
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"

# DVC replaces {refresh_tag} and {plot_divs}. There is no {scripts}: DVC would put its CDN <script> tags there.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Written by `python -m stages.results.plots` from vl-convert-python __VERSIONS__; do not edit. -->
    <script>
(() => {
__BUNDLE__
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""

# The card plots read what dvc.yaml's `plots:` section plots, relative to the repository (or workspace) root.
LOSS_CURVES = {"seq2seq": "dvclive/train_seq2seq/plots/metrics/train/loss.tsv",
               "vlm": "dvclive/train_vlm/plots/metrics/train/loss.tsv"}
# the trainers' model selection (LiveCallback in stages/training/trainer.py): each evaluation's score, and the kept one
SELECTION = {model: {"evaluations": f"dvclive/train_{model}/plots/custom/evaluations.json",
                     "kept": f"dvclive/train_{model}/plots/custom/kept.json"} for model in ("seq2seq", "vlm")}
COMPARISON = "eval/comparison.csv"
CIDER_D = "eval/cider_d.csv"


def template_html() -> str:
    """The offline page: DVC's default page with the bundle in place of the CDN tags. The bundle sets window.vega,
    window.vegaLite and window.vegaEmbed itself; the arrow function keeps its other top-level names out of the global
    scope, where they could clash with the `var spec` of each plot's inline script."""
    bundle = vl_convert.javascript_bundle(vl_version=VL_VERSION)
    for placeholder in ("{plot_divs}", "{refresh_tag}", "{scripts}", "</script"):
        # DVC fills placeholders by plain string replacement, and "</script" would end the <script> element early.
        if placeholder in bundle:
            raise ValueError(f"the vl-convert bundle contains {placeholder!r}: it cannot be inlined as is")
    versions = (f"{vl_convert.__version__}: vega {vl_convert.get_vega_version()}, vega-lite {VL_VERSION}, "
                f"vega-embed {vl_convert.get_vega_embed_version()}")
    return PAGE.replace("__VERSIONS__", versions).replace("__BUNDLE__", bundle)


def write_template(path: Path = TEMPLATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_html(), encoding="utf-8")
    return path


def _rows(path: Path, delimiter: str = ",") -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def loss_spec(curves: dict[str, Path]) -> dict:
    """One line per model: dvclive's train/loss.tsv (columns step, loss) against the optimizer step."""
    values = [{"model": model, "step": int(row["step"]), "loss": float(row["loss"])}
              for model, path in curves.items() for row in _rows(path, "\t")]
    return {"$schema": SCHEMA, "title": "Training loss", "width": 480, "height": 280, "data": {"values": values},
            # points only while few: they mark the logged steps, and would hide a long curve
            "mark": {"type": "line", "point": len(values) <= 60},
            "encoding": {"x": {"field": "step", "type": "quantitative", "title": "step"},
                         "y": {"field": "loss", "type": "quantitative", "title": "loss"},
                         "color": {"field": "model", "type": "nominal", "title": "model"}}}


def selection_spec(selections: dict[str, dict[str, Path]]) -> dict:
    """One line per model through its validation score at each evaluation, and a large point on the step whose
    weights the model kept (the best under `keep: best`, else the last). The metric may differ between models: it
    names each line."""
    lines, kept = [], []
    for model, paths in selections.items():
        points = {name: json.loads(Path(path).read_text()) for name, path in paths.items()}
        label = f"{model} ({points['kept'][0]['metric']})"
        lines += [{"model": label, "step": p["step"], "score": p["score"]} for p in points["evaluations"]]
        kept += [{"model": label, "step": p["step"], "score": p["score"]} for p in points["kept"]]
    encoding = {"x": {"field": "step", "type": "quantitative", "title": "step"},
                "y": {"field": "score", "type": "quantitative", "title": "validation score"},
                "color": {"field": "model", "type": "nominal", "title": "model"}}
    return {"$schema": SCHEMA, "title": "Model selection: validation score per evaluation, the kept step marked",
            "width": 480, "height": 280, "encoding": encoding,
            "layer": [{"data": {"values": lines}, "mark": {"type": "line", "point": True}},
                      {"data": {"values": kept}, "mark": {"type": "point", "shape": "diamond", "size": 220,
                                                         "filled": True, "opacity": 0.9}}]}


def bars_spec(path: Path, title: str) -> dict:
    """evaluate's table (entry "metric / model", score) as grouped bars: one group per metric, one colour per model,
    so that each trained model sits beside its untrained twin."""
    values = []
    for row in _rows(path):
        metric, _, model = row["entry"].partition(" / ")
        values.append({"metric": metric, "model": model, "score": float(row["score"])})
    models = list(dict.fromkeys(v["model"] for v in values))
    return {"$schema": SCHEMA, "title": title, "width": 480, "data": {"values": values},
            "height": {"step": 14},   # with yOffset, the step is each bar's, not each metric's
            "mark": "bar",
            "encoding": {"y": {"field": "metric", "type": "nominal", "sort": None, "title": None},
                         "yOffset": {"field": "model", "type": "nominal", "sort": models},
                         "x": {"field": "score", "type": "quantitative", "title": "score"},
                         "color": {"field": "model", "type": "nominal", "sort": models, "title": "model"},
                         "tooltip": [{"field": "model"}, {"field": "metric"}, {"field": "score"}]}}


def render_card_plots(out_dir: str | Path, root: str | Path = ".") -> list[Path]:
    """PNGs for the model card, written into out_dir: training_loss.png (both models' training loss),
    selection.png (their validation score per evaluation, the kept step marked), comparison.png (the test metrics
    on a 0-100 scale, trained vs untrained) and cider_d.png (CIDEr-D, trained vs untrained).
    Reads LOSS_CURVES, SELECTION, COMPARISON and CIDER_D under root; a missing one raises FileNotFoundError."""
    root, out_dir = Path(root), Path(out_dir)
    selections = {model: {name: root / path for name, path in paths.items()} for model, paths in SELECTION.items()}
    specs = {"training_loss.png": loss_spec({model: root / path for model, path in LOSS_CURVES.items()}),
             "selection.png": selection_spec(selections),
             "comparison.png": bars_spec(root / COMPARISON, "Test metrics, trained vs untrained"),
             "cider_d.png": bars_spec(root / CIDER_D, "CIDEr-D, trained vs untrained")}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in specs.items():
        # scale 2: sharp on high-density screens, where Hub model cards are mostly read.
        png = vl_convert.vegalite_to_png(json.dumps(spec), vl_version=VL_VERSION, scale=2)
        (out_dir / name).write_bytes(png)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":
    print(f"wrote {write_template().relative_to(REPO)}")
