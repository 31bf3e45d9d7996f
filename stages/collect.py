"""collect: gather the samples of every entry of `collect.sources` into data/raw.

- `synthetic` (the embedded default) generates the moving-shapes video set (stages/data/synthetic.py).
- `local` reads a folder of videos and an annotation file in one of the formats of stages/data/formats.py.
- `urls` downloads a list of videos (stages/data/fetch.py); they get captions later, from `extract.caption_model`.
- `listing` reads "<path or URL> <sha256>" lines: videos anywhere (local, http(s), any fsspec URL), checked against
  their sha256; DVC depends on the listing file alone, never on the videos (the kind for large sets).

Every video is stored once, content-addressed, as videos/<sha256><ext> (the name samples.jsonl gives it), inside the
packs of data/raw/videos/ (stages/data/packs.py: tar files grouped by sha256 prefix, at most
`collect.pack_megabytes` each, so DVC tracks a few hundred files, not one per video); data/raw/videos/index.json says
where each one lies.
data/raw/samples.jsonl holds one sample per row: its videos, the conversation or question and caption, the text
metadata the seq2seq model learns from, and the split. Everything follows from `base.seed`, so two runs give identical
bytes, on any machine.
data/raw/rejects.jsonl lists every row or video of the other sources that could not be used, with its reason.
"""
from collections import Counter
from pathlib import Path

from stages.common.files import atomic_dir, jsonl_line, write_json
from stages.common.params import load
from stages.data import packs, sources, synthetic

OUT = Path("data/raw")


def main() -> None:
    # Load
    params = load("collect")
    p, seed = params["collect"], params["base"]["seed"]

    # Build and save, one sample at a time: an imported annotation file of millions of rows is never held whole
    counts = Counter()
    with atomic_dir(OUT) as out, open(out / "samples.jsonl", "w") as samples, \
            open(out / "rejects.jsonl", "w") as rejects:
        (out / "videos").mkdir()
        for kind, row in rows(p, seed, out / "videos"):
            (samples if kind == "sample" else rejects).write(jsonl_line(row))
            counts[kind] += 1
        # Pack: each video was stored on its own as it came; DVC gets a few hundred packs and their index
        stored = sorted((out / "videos").iterdir())
        write_json(out / "videos" / packs.INDEX, packs.write(out / "videos", stored, p["pack_megabytes"] << 20))
    print(f"collect: {counts['sample']} samples, {counts['reject']} rejected -> {OUT}/")


def rows(p: dict, seed: int, videos: Path):
    """("sample", sample) and ("reject", record) of every source in order, imported samples with their split."""
    for source in p["sources"]:
        if source["kind"] == "synthetic":
            yield from (("sample", sample) for sample in synthetic.generate(p, seed, videos))
            continue
        for kind, row in sources.import_source(source, p["download"], videos, p["max_line_bytes"]):
            if kind == "sample" and row.get("split") not in ("train", "val", "test"):
                row["split"] = sources.assign_split(row["id"], p["val_fraction"], p["test_fraction"])
            yield kind, row


if __name__ == "__main__":
    main()
