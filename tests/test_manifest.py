import json

import jsonschema

from stages import extract, manifest
from stages.common.files import read_jsonl, write_jsonl
from tests.helpers import add_broken_video, write_params

SCHEMA = json.loads((manifest.SCHEMAS / "manifest_v1.json").read_text())


def rows(workspace, split):
    return read_jsonl(workspace / "data/manifest" / f"{split}.jsonl")


def test_rows_are_valid_and_split_as_collected(workspace):
    samples = {s["id"]: s for s in read_jsonl(workspace / "data/raw/samples.jsonl")}
    total = 0
    for split in manifest.SPLITS:
        for row in rows(workspace, split):
            jsonschema.validate(row, SCHEMA)
            assert row["split"] == split == samples[row["id"]]["split"]
            assert row["messages"][0]["content"].count("<video>") == len(row["videos"]) == 1
            assert row["messages"][1] == {"role": "assistant", "content": samples[row["id"]]["caption"]}
            assert all(tag in row["source"] for tag in samples[row["id"]]["meta"]["tags"])
            total += 1
    stats = json.loads((workspace / "data/manifest/stats.json").read_text())
    assert total == len(samples) == stats["samples"] == stats["train"] + stats["val"] + stats["test"]
    assert stats["rejected"] == 0


def test_manifest_is_deterministic(workspace):
    before = {s: (workspace / f"data/manifest/{s}.jsonl").read_bytes() for s in manifest.SPLITS}
    manifest.main()
    assert before == {s: (workspace / f"data/manifest/{s}.jsonl").read_bytes() for s in manifest.SPLITS}


def test_bad_samples_are_rejected_with_their_reason_and_the_rest_survive(workspace):
    video = add_broken_video(workspace)
    write_params(workspace, {"extract": {"max_bad_fraction": 0.1}})
    extract.main()
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    good = samples[1]
    samples += [{**good, "id": "bad id\twith a tab"}, {**good, "id": "clips/7.mp4 #question 2"},
                {**good, "id": "duplicate"}, {**good, "id": "duplicate"},
                {**good, "id": "two-placeholders", "question": "<video> compare with <video>"},
                {key: value for key, value in good.items() if key != "caption"} | {"id": "no-caption"},
                {**good, "id": "bad-split", "split": "holdout"}]
    write_jsonl(workspace / "data/raw/samples.jsonl", samples)
    manifest.main()
    rejects = {r["id"]: r for r in read_jsonl(workspace / "data/manifest/rejects.jsonl")}
    assert rejects["broken-0"]["reason"].startswith("video quarantined: cannot open")
    assert rejects["bad id\twith a tab"]["reason"].startswith("schema: field id:")
    assert "clips/7.mp4 #question 2" not in rejects     # ids as sources spell them, slashes and spaces too
    assert rejects["duplicate"]["reason"] == "duplicate id 'duplicate'"
    assert rejects["two-placeholders"]["reason"] == "3 <video> placeholders for 1 videos"
    assert rejects["no-caption"]["reason"] == "missing field 'caption'"
    assert rejects["bad-split"]["reason"].startswith("schema: field split:")
    assert rejects["no-caption"]["source"].endswith(f"samples.jsonl:{len(samples) - 1}")
    stats = json.loads((workspace / "data/manifest/stats.json").read_text())
    assert stats["rejected"] == 6 and stats["train"] + stats["val"] + stats["test"] == len(samples) - 6
    assert stats["rejected_by_reason"]["video quarantined: cannot open"] == 1
    assert video.endswith(".mp4")


def test_preference_pairs_keep_their_rejected_answer_and_a_pair_that_does_not_differ_is_rejected(workspace):
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    samples.append({**samples[1], "id": "same-answers", "rejected": samples[1]["caption"]})
    write_jsonl(workspace / "data/raw/samples.jsonl", samples)
    manifest.main()
    kept = {row["id"]: row for split in manifest.SPLITS for row in rows(workspace, split)}
    assert kept[samples[0]["id"]]["rejected"] == samples[0]["rejected"] != kept[samples[0]["id"]]["target"]
    rejects = {r["id"]: r for r in read_jsonl(workspace / "data/manifest/rejects.jsonl")}
    assert rejects["same-answers"]["reason"] == "preference pair: the rejected answer equals the chosen one"
