"""collect: gather the samples of every entry of `collect.sources` into data/raw.

- `synthetic` (the embedded default) generates the moving-shapes video set (stages/data/synthetic.py).
- `local` reads a folder of videos and an annotation file in one of the formats of stages/data/formats.py.
- `urls` downloads a list of videos (stages/data/fetch.py); they get captions later, from `extract.caption_model`.

Every video is stored once, content-addressed, as data/raw/videos/<sha256><ext>.
data/raw/samples.jsonl holds one sample per row: its videos, the conversation or question and caption, the text
metadata the seq2seq model learns from, and the split. Everything follows from `base.seed`, so two runs give identical
bytes, on any machine.
data/raw/rejects.jsonl lists every row or video of the other sources that could not be used, with its reason.
"""
from pathlib import Path

from stages.common.files import atomic_dir, write_jsonl
from stages.common.params import load
from stages.data import sources, synthetic

OUT = Path("data/raw")


def main() -> None:
    # Load
    params = load("collect")
    p, seed = params["collect"], params["base"]["seed"]

    # Build
    samples, rejects = [], []
    with atomic_dir(OUT) as out:
        (out / "videos").mkdir()
        for source in p["sources"]:
            if source["kind"] == "synthetic":
                samples += synthetic.generate(p, seed, out / "videos")
                continue
            imported, rejected = sources.import_source(source, p["download"], out / "videos")
            for sample in imported:
                if sample.get("split") not in ("train", "val", "test"):
                    sample["split"] = sources.assign_split(sample["id"], p["val_fraction"], p["test_fraction"])
            samples += imported
            rejects += rejected
        # Save
        write_jsonl(out / "samples.jsonl", samples)
        write_jsonl(out / "rejects.jsonl", rejects)
    print(f"collect: {len(samples)} samples, {len(rejects)} rejected -> {OUT}/")


if __name__ == "__main__":
    main()
