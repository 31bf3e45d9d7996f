import json
import shutil

import pytest
from safetensors.numpy import load_file

from stages import extract
from stages.common.files import read_jsonl, sha256_file, write_jsonl
from tests.helpers import TINY_VLM, add_broken_video, build_whisper, ffmpeg, write_params


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


def test_audio_transcripts_and_auto_captions_reach_the_manifest(workspace, tmp_path):
    """A collected sample without a caption, whose video has a sound track: extract stores its 16 kHz audio,
    transcribes it with a tiny Whisper and captions it with a tiny LLaVA (both loaded by path, as a hub id would be);
    manifest then trains on the auto-caption and gives the transcript to the seq2seq source."""
    from stages import manifest
    from stages.models.vlm import llava

    talking = tmp_path / "talking.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8", "-f", "lavfi", "-i", "sine=frequency=300",
           "-t", "2", "-c:v", "libx264", "-c:a", "aac", "-shortest", str(talking))
    name = f"videos/{sha256_file(talking)}.mp4"
    shutil.copy(talking, workspace / "data/raw" / name)
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    uncaptioned = {"id": "uncaptioned", "videos": [name], "question": "Describe the video.", "caption": None,
                   "meta": {}, "split": "train"}
    write_jsonl(workspace / "data/raw/samples.jsonl", samples + [uncaptioned])
    whisper = build_whisper(tmp_path / "whisper")
    vlm = llava.build_tiny(TINY_VLM, ["a test pattern with a tone"], 32, tmp_path / "llava")
    write_params(workspace, {"extract": {"audio": True, "transcribe_model": str(whisper),
                                         "caption_model": str(vlm), "caption_max_tokens": 6}})
    extract.main()
    manifest.main()

    entry = json.loads((workspace / "data/frames/report.json").read_text())["videos"][name]
    audio = load_file(str(workspace / "data/frames" / entry["shard"]))["audio"]
    assert audio.dtype == "float32" and abs(len(audio) - 2 * 16000) < 1600 and entry["audio_seconds"] > 1.8
    assert isinstance(entry["transcript"], str) and isinstance(entry["auto_caption"], str)
    silent = json.loads((workspace / "data/frames/report.json").read_text())["videos"][samples[0]["videos"][0]]
    assert silent["audio_seconds"] == 0 and "transcript" not in silent and "auto_caption" not in silent
    rows = {r["id"]: r for r in read_jsonl(workspace / "data/manifest/train.jsonl")}
    if entry["auto_caption"]:
        assert rows["uncaptioned"]["target"] == entry["auto_caption"]
    else:   # random weights may decode to nothing: then the sample is rejected, with that reason
        rejects = {r["id"]: r for r in read_jsonl(workspace / "data/manifest/rejects.jsonl")}
        assert rejects["uncaptioned"]["reason"].startswith("no caption")


@pytest.mark.parametrize("overrides, message", [
    ({"num_frames": 4, "fps": 2.0}, "exactly one of extract.num_frames and extract.fps"),
    ({"num_frames": 0, "fps": 0}, "exactly one of extract.num_frames and extract.fps"),
    ({"frame_size": 32, "max_pixels": 50176}, "exactly one of extract.frame_size and extract.max_pixels"),
    ({"transcribe_model": "openai/whisper-small", "audio": False}, "needs extract.audio: true"),
])
def test_contradictory_params_stop_the_stage_before_any_work(workspace, overrides, message):
    write_params(workspace, {"extract": overrides})
    before = sorted(p.name for p in (workspace / "data/frames").iterdir())
    with pytest.raises(SystemExit, match=message):
        extract.main()
    assert sorted(p.name for p in (workspace / "data/frames").iterdir()) == before


def test_fps_mode_and_the_qwen_size_rule_through_the_stage(workspace):
    write_params(workspace, {"extract": {"num_frames": 0, "fps": 4.0, "frame_size": 0, "max_pixels": 56 * 56,
                                         "workers": 1}})
    extract.main()
    report = json.loads((workspace / "data/frames/report.json").read_text())
    entry = next(iter(report["videos"].values()))
    frames = load_file(str(workspace / "data/frames" / entry["shard"]))["frames"]
    assert frames.shape == (8, 56, 56, 3)                     # 2 s x 4 fps; 64 px rounded to a multiple of 28
    assert entry["frames"] == 8 and entry["timestamps"][-1] == 1.875
    assert entry["shard_sha256"] == sha256_file(workspace / "data/frames" / entry["shard"])
