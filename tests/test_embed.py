import json

import pytest

from stages import embed
from stages.common.files import read_jsonl
from tests.helpers import SMALL, write_params

CACHED = {**SMALL["train_vlm"], "freeze_vision": True, "cache_vision": True}


def test_with_the_cache_off_embed_writes_only_an_index_that_says_so(workspace):
    embed.main()
    folder = workspace / "data/vision_cache"
    assert [path.name for path in folder.iterdir()] == ["index.json"]
    assert json.loads((folder / "index.json").read_text()) == {"enabled": False,
                                                               "reason": "train_vlm.cache_vision is false"}


def test_embed_caches_the_frames_of_every_train_and_val_sample_in_packs(workspace):
    write_params(workspace, {**SMALL, "train_vlm": CACHED})
    embed.main()
    folder = workspace / "data/vision_cache"
    index = json.loads((folder / "index.json").read_text())
    rows = read_jsonl(workspace / "data/manifest/train.jsonl") + read_jsonl(workspace / "data/manifest/val.jsonl")
    locators = json.loads((workspace / "data/frames/index.json").read_text())
    shards = {video["sha256"]: locators[video["frames"]]["length"] for row in rows for video in row["videos"]}
    assert (index["enabled"], index["family"], index["videos"]) == (True, "llava", len(shards))
    assert 0 < index["frames"] <= sum(video["num_frames"] for row in rows for video in row["videos"])
    assert index["frame_bytes"] == sum(shards.values())
    assert sorted(path.name for path in folder.iterdir()) == ["index.json", *index["packs"]]   # no tiny base left
    assert len(index["tower"]) == 64 and index["bytes"] > 0


def test_a_family_that_cannot_cache_stops_embed_before_it_writes_anything(workspace):
    write_params(workspace, {**SMALL, "train_vlm": {**CACHED, "family": "qwen3_vl"}})
    with pytest.raises(ValueError, match="qwen3_vl cannot cache its vision features"):
        embed.main()
    assert not list((workspace / "data").glob("vision_cache*"))
