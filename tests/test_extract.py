import json
import shutil

import pytest
from safetensors.numpy import load_file

from stages import extract
from stages.files import read_jsonl, write_jsonl
from tests.conftest import write_params


def test_one_shard_per_video_with_the_params_frames(workspace):
    report = json.loads((workspace / "data/frames/report.json").read_text())
    videos = {v for s in read_jsonl(workspace / "data/raw/samples.jsonl") for v in s["videos"]}
    assert set(report["videos"]) == videos
    assert report["summary"] == {"videos": len(videos), "ok": len(videos), "quarantined": 0}
    shards = sorted(p.name for p in (workspace / "data/frames").glob("*.safetensors"))
    assert len(shards) == len(videos)
    frames = load_file(str(workspace / "data/frames" / shards[0]))
    assert frames["frames"].shape == (4, 32, 32, 3)
    assert frames["timestamps"].tolist() == sorted(frames["timestamps"].tolist())


def add_broken_video(workspace, name="f" * 64 + ".mp4"):
    (workspace / "data/raw/videos" / name).write_bytes(b"not a video")
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    broken = {**samples[0], "id": "broken-0", "videos": [f"videos/{name}"]}
    write_jsonl(workspace / "data/raw/samples.jsonl", samples + [broken])
    return f"videos/{name}"


def test_a_broken_video_is_quarantined_with_its_reason(workspace):
    video = add_broken_video(workspace)
    write_params(workspace, {"extract": {"max_bad_fraction": 0.1}})
    extract.main()
    report = json.loads((workspace / "data/frames/report.json").read_text())
    assert report["videos"][video]["status"] == "quarantined"
    assert "cannot open" in report["videos"][video]["reason"]
    assert report["summary"]["quarantined"] == 1 and report["summary"]["ok"] == report["summary"]["videos"] - 1


def test_too_many_broken_videos_fail_the_stage_and_leave_no_output(workspace):
    add_broken_video(workspace)
    shutil.rmtree(workspace / "data/frames")
    write_params(workspace, {"extract": {"max_bad_fraction": 0.0}})
    with pytest.raises(SystemExit, match=r"1 of 25 videos failed.*extract\.max_bad_fraction"):
        extract.main()
    assert not (workspace / "data/frames").exists()
    assert not (workspace / "data/frames.partial").exists()
