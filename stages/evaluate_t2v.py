"""evaluate_t2v: what the text-to-video model makes of the test captions, read by a fixed analyser, against its
untrained twin.

For each distinct test caption, `samples_per_caption` clips are generated (seeds 0, 1, ...) by the exported pipeline's
own `__call__`, at the training clips' frame count and size. stages/results/motion.py reads the blob's colour and
direction from each; the real test clips are read too, which checks the analyser on this data. A Fréchet distance on
frame thumbnails compares each model's frames with the real test frames.
Output: eval/t2v/metrics.json ({"t2v", "t2v_untrained", "real"} -> color_accuracy, direction_accuracy,
frechet_distance), eval/t2v/clips.jsonl (what was read from each generated clip), eval/t2v/strips/<caption>.png
(the trained model's first clip per caption, frames side by side: a `dvc plots` image).
"""
import json
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)

from stages.common.files import atomic_dir, read_jsonl, write_json, write_jsonl
from stages.common.params import load
from stages.models import t2v
from stages.results import motion
from stages.training import diffusion

MANIFEST = Path("data/manifest")
MODEL = Path("models/t2v")
OUT = Path("eval/t2v")


def main() -> None:
    quiet_libraries()
    # Load
    p = load("evaluate_t2v")["evaluate_t2v"]
    record = json.loads((MODEL / "training.json").read_text())
    fam = t2v.family(record["family"])
    num_frames, side = record["clip_shape"][0], record["clip_shape"][1]
    rows, real, _ = t2v.load_clips(read_jsonl(MANIFEST / "test.jsonl"), num_frames)
    attributes = {row["target"]: row.get("attributes") for row in rows}
    captions = sorted(attributes) * p["samples_per_caption"]
    asked = [attributes[caption] for caption in captions]
    if any(a is None for a in asked):
        raise SystemExit("evaluate_t2v: the analyser scores clips of the synthetic set, whose rows name their color "
                         "and direction (attributes); these test rows do not")

    # Generate
    clips = {}
    for name, path in (("t2v", MODEL / "pipeline"), ("t2v_untrained", Path(record["base_model"]))):
        pipe = t2v.load_pipeline(fam, path).to(diffusion.device())
        pipe.set_progress_bar_config(disable=True)
        clips[name] = diffusion.generate(pipe, fam, captions, num_frames, side, p["steps"], p["guidance_scale"],
                                         seed=0, batch=p["batch_size"])

    # Score and save
    metrics, read = {}, {}
    for name, generated in clips.items():
        accuracy, read[name] = motion.score(generated, asked)
        metrics[name] = {**accuracy, "frechet_distance": motion.frechet_distance(real, generated)}
    metrics["real"] = motion.score(real, [row["attributes"] for row in rows])[0]
    with atomic_dir(OUT) as out:
        write_json(out / "metrics.json", metrics)
        write_jsonl(out / "clips.jsonl", [{"model": name, "caption": caption, "seed": i // len(attributes),
                                           "asked": a, "read": r}
                                          for name in clips for i, (caption, a, r) in
                                          enumerate(zip(captions, asked, read[name]))])
        (out / "strips").mkdir()
        for caption, clip in zip(captions[:len(attributes)], clips["t2v"]):
            motion.save_strip(clip, out / "strips" / f"{caption.replace(' ', '_')}.png")
    for name, scores in metrics.items():
        print(f"evaluate_t2v: {name:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
