"""manifest: join samples with their decoded frames into train/val/test JSONL, every row checked by JSON Schema.

A sample whose video was quarantined by `extract`, or whose row breaks the schema, is not silently lost: it goes to
data/manifest/rejects.jsonl with its reason, beside the rows `collect` could not import, and stats.json (a DVC
metric) counts rows per split and rejects by kind. Samples collected without a caption take the auto-caption
`extract` made, if it made one. A preference pair keeps its rejected answer beside the conversation, whose last
assistant turn is the chosen one.
"""
import json
from collections import Counter
from pathlib import Path

import jsonschema

from stages.common.files import atomic_dir, read_jsonl, write_json, write_jsonl
from stages.common.params import load
from stages.data.formats import SPLITS, VIDEO  # VIDEO: one per video in user turns, expanded per family

RAW = Path("data/raw")
FRAMES = Path("data/frames")
OUT = Path("data/manifest")
SCHEMAS = Path(__file__).parent / "schema"


def seq2seq_source(sample: dict) -> str:
    """The text the seq2seq model sees: the question plus the video's metadata (no pixels)."""
    meta = sample.get("meta", {})
    parts = [sample["question"]]
    if sample.get("transcript"):
        parts.append(f"transcript: {sample['transcript']}")
    if "title" in meta:
        parts.append(f"title: {meta['title']}")
    if meta.get("tags"):
        parts.append("tags: " + ", ".join(meta["tags"]))
    if "duration" in meta:
        parts.append(f"duration: {meta['duration']} s")
    return " | ".join(parts)


def chat(sample: dict, caption: str, videos: int) -> list[dict]:
    """The sample's own conversation (imported formats), or a question about its videos and the caption."""
    if "messages" not in sample:
        return [{"role": "user", "content": "".join(VIDEO + "\n" for _ in range(videos)) + sample["question"]},
                {"role": "assistant", "content": caption}]
    messages = list(sample["messages"])
    if not any(m["role"] == "assistant" for m in messages):
        messages.append({"role": "assistant", "content": caption})
    return messages


def build_row(sample: dict, decoded: dict) -> dict:
    """Turn one collected sample into a manifest row; raise ValueError with the reason when it cannot be used."""
    videos, transcripts = [], []
    for video in sample["videos"]:
        entry = decoded.get(video)
        if entry is None:
            raise ValueError(f"video not extracted: {video}")
        if entry["status"] != "ok":
            raise ValueError(f"video quarantined: {entry['reason']}")
        videos.append({"sha256": Path(video).name.split(".")[0], "frames": entry["shard"],
                       "num_frames": entry["frames"], "timestamps": entry["timestamps"]})
        transcripts += [entry["transcript"]] if entry.get("transcript") else []
    first = decoded.get(sample["videos"][0], {}) if sample["videos"] else {}
    caption = sample["caption"] or first.get("auto_caption")
    if not caption:
        raise ValueError("no caption: none collected and no auto-caption (extract.caption_model)")
    sample = {**sample, "transcript": " ".join(transcripts) or sample.get("meta", {}).get("transcript")}
    row = {"id": sample["id"], "split": sample["split"], "videos": videos,
           "messages": chat(sample, caption, len(videos)), "source": seq2seq_source(sample), "target": caption}
    for key in ("attributes", "rejected"):
        if key in sample:
            row[key] = sample[key]
    return row


def check_placeholders(row: dict) -> None:
    found = sum(m["content"].count(VIDEO) for m in row["messages"] if m["role"] == "user")
    if found != len(row["videos"]):
        raise ValueError(f"{found} {VIDEO} placeholders for {len(row['videos'])} videos")


def check_pair(row: dict) -> None:
    """A preference pair's rejected answer stands in for the last assistant turn, the chosen one: they must differ."""
    if "rejected" in row and row["rejected"] == [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]:
        raise ValueError("preference pair: the rejected answer equals the chosen one")


def main() -> None:
    # Load
    p = load("manifest")["manifest"]
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{p['schema']}.json").read_text()))
    samples = read_jsonl(RAW / "samples.jsonl")
    collect_rejects = read_jsonl(RAW / "rejects.jsonl")
    decoded = json.loads((FRAMES / "report.json").read_text())["videos"]

    # Build
    rows, seen = {split: [] for split in SPLITS}, set()
    rejects = [{**r, "kind": f"collect: {r.get('field') or 'row'}".split("/")[0]} for r in collect_rejects]
    for line, sample in enumerate(samples, 1):
        try:
            if sample.get("id") in seen:
                raise ValueError(f"duplicate id {sample['id']!r}")
            row = build_row(sample, decoded)
            error = next(iter(sorted(validator.iter_errors(row), key=lambda e: list(e.absolute_path))), None)
            if error is not None:
                field = "/".join(map(str, error.absolute_path)) or "(row)"
                raise ValueError(f"schema: field {field}: {error.message}")
            check_placeholders(row)
            check_pair(row)
        except (KeyError, ValueError) as error:
            reason = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            kind = ":".join(reason.split(":")[:2 if reason.startswith("video quarantined") else 1])
            rejects.append({"id": sample.get("id"), "source": f"{RAW / 'samples.jsonl'}:{line}", "reason": reason,
                            "kind": kind})
            continue
        seen.add(row["id"])
        rows[row["split"]].append(row)

    # Save
    with atomic_dir(OUT) as out:
        for split in SPLITS:
            write_jsonl(out / f"{split}.jsonl", rows[split])
        write_jsonl(out / "rejects.jsonl", rejects)
        kinds = Counter(r["kind"] for r in rejects)
        write_json(out / "stats.json", {"samples": len(samples) + len(collect_rejects),
                                        **{split: len(rows[split]) for split in SPLITS},
                                        "rejected": len(rejects), "rejected_by_reason": dict(sorted(kinds.items()))})
    print(f"manifest: {', '.join(f'{s}={len(rows[s])}' for s in SPLITS)}, rejected={len(rejects)} -> {OUT}/")


if __name__ == "__main__":
    main()
