import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from hashlib import sha256
from io import BytesIO
from pathlib import Path

import psutil
import pytest
from pebble import ProcessPool
from PIL import Image

from stages import extract
from stages.common.files import read_jsonl, sha256_file, write_jsonl
from stages.data import packs
from stages.data.frames import load_shard
from tests.helpers import (
    REPO,
    TINY_VLM,
    add_broken_video,
    add_collected,
    add_hanging,
    build_whisper,
    ffmpeg,
    make_video,
    write_params,
)


def test_one_shard_per_video_with_the_params_frames_in_packs_grouped_by_sha256_prefix(workspace):
    report = json.loads((workspace / "data/frames/report.json").read_text())
    videos = {v for s in read_jsonl(workspace / "data/raw/samples.jsonl") for v in s["videos"]}
    assert set(report["videos"]) == videos
    assert report["summary"] == {"videos": len(videos), "ok": len(videos), "quarantined": 0}
    files = sorted(p.name for p in (workspace / "data/frames").iterdir())
    groups = {Path(video).name[:2] for video in videos}
    assert files == sorted([f"{group}-0.tar" for group in groups] + ["index.json", "report.json"])
    index = json.loads((workspace / "data/frames/index.json").read_text())
    assert sorted(index) == sorted(entry["shard"] for entry in report["videos"].values())
    for video, entry in report["videos"].items():
        locator = index[entry["shard"]]
        assert locator["pack"] == f"{Path(video).name[:2]}-0.tar"
        assert sha256(packs.read(workspace / "data/frames", locator)).hexdigest() == entry["shard_sha256"]
    frames = load_shard(entry["shard"], workspace / "data/frames")
    assert frames["frames"].shape == (4, 32, 32, 3)
    assert frames["timestamps"].tolist() == sorted(frames["timestamps"].tolist())


def test_a_new_video_rewrites_the_pack_of_its_group_only(workspace, tmp_path):
    before = {path.name: sha256_file(path) for path in (workspace / "data/frames").glob("*.tar")}
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    clip = make_video(tmp_path / "new.mp4", seconds=1)
    (name,) = add_collected(workspace, [clip.rename(tmp_path / f"{sha256_file(clip)}.mp4")])
    write_jsonl(workspace / "data/raw/samples.jsonl", samples + [{**samples[0], "id": "new", "videos": [name]}])
    extract.main()
    after = {path.name: sha256_file(path) for path in (workspace / "data/frames").glob("*.tar")}
    group = Path(name).name[:2]
    assert {pack for pack in after if after[pack] != before.get(pack)} == {f"{group}-0.tar"}
    assert set(before) <= set(after)


def test_a_broken_video_is_quarantined_with_its_reason(workspace):
    video = add_broken_video(workspace)
    write_params(workspace, {"extract": {"max_bad_fraction": 0.1}})
    extract.main()
    report = json.loads((workspace / "data/frames/report.json").read_text())
    assert report["videos"][video]["status"] == "quarantined"
    assert "cannot open" in report["videos"][video]["reason"]
    assert report["summary"]["quarantined"] == 1 and report["summary"]["ok"] == report["summary"]["videos"] - 1


def test_the_ray_engine_writes_the_same_bytes_as_the_local_one_and_quarantines_alike(workspace):
    """A real local Ray with 2 workers (RAY_ADDRESS unset): one task per sha256-prefix group of videos."""
    video = add_broken_video(workspace)
    write_params(workspace, {"extract": {"max_bad_fraction": 0.1, "workers": 2}})
    extract.main()
    local = {path.name: sha256_file(path) for path in (workspace / "data/frames").iterdir()}
    write_params(workspace, {"extract": {"max_bad_fraction": 0.1, "workers": 2, "engine": "ray"}})
    extract.main()
    assert {path.name: sha256_file(path) for path in (workspace / "data/frames").iterdir()} == local
    report = json.loads((workspace / "data/frames/report.json").read_text())
    assert "cannot open" in report["videos"][video]["reason"] and "engine" not in report["params"]


def test_a_video_pack_cut_short_or_unindexed_video_stops_the_stage_before_any_work(workspace):
    """A checkout gone wrong is an error naming the pack and its videos, not a quarantine of valid videos."""
    before = {path.name: sha256_file(path) for path in (workspace / "data/frames").iterdir()}
    pack = sorted((workspace / "data/raw/videos").glob("*.tar"))[0]
    with open(pack, "r+b") as f:
        f.truncate(1000)
    shown = rf"\d+ member\(s\): videos/{pack.name[:2]}[0-9a-f]{{62}}\.mp4"
    with pytest.raises(SystemExit, match=rf"extract: \S+/{pack.name} holds 1000 bytes, its members need \d+: the "
                                         rf"pack of {shown}"):
        extract.main()
    (workspace / "data/raw/videos" / packs.INDEX).write_text("{}")
    with pytest.raises(SystemExit, match=r"index\.json lacks 24 of the files that data/raw/samples\.jsonl names, "
                                         r"first videos/[0-9a-f]{64}\.mp4"):
        extract.main()
    assert {path.name: sha256_file(path) for path in (workspace / "data/frames").iterdir()} == before


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
    (name,) = add_collected(workspace, [talking.rename(tmp_path / f"{sha256_file(talking)}.mp4")])
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
    audio = load_shard(entry["shard"], workspace / "data/frames")["audio"]
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
    frames = load_shard(entry["shard"], workspace / "data/frames")["frames"]
    assert frames.shape == (8, 56, 56, 3)                     # 2 s x 4 fps; 64 px rounded to a multiple of 28
    assert entry["frames"] == 8 and entry["timestamps"][-1] == 1.875


# ---------------------------------------------------------------- hostile videos: every decode is bounded

def add_samples(workspace, names) -> list[str]:
    """One sample per collected file (`names` as samples.jsonl gives them), appended to samples.jsonl."""
    samples = read_jsonl(workspace / "data/raw/samples.jsonl")
    added = [{**samples[0], "id": f"hostile-{i}", "videos": [name]} for i, name in enumerate(names)]
    write_jsonl(workspace / "data/raw/samples.jsonl", samples + added)
    return names


def run_stage(workspace, limit_s: float) -> float:
    """`python -m stages.extract` in the workspace, as dvc runs it; its wall time. A hang fails the test at limit_s."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "stages.extract"], cwd=workspace, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, timeout=limit_s, capture_output=True)
    return time.monotonic() - started


def test_hung_huge_and_endless_videos_are_quarantined_within_their_limits(workspace, tmp_path):
    fifo = add_hanging(workspace, "a" * 64 + ".mp4")
    header = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n"
    (tmp_path / ("b" * 64 + ".y4m")).write_bytes(header + bytes(999))
    make_video(tmp_path / ("c" * 64 + ".mp4"), seconds=3, size="16x16", rate=1000)       # 3000 frames, counted in mp4
    make_video(tmp_path / ("d" * 64 + ".mkv"), seconds=3, size="16x16", rate=1000)       # mkv: found by the packets
    huge, claimed, counted = add_collected(workspace, sorted(tmp_path.glob("[bcd]" * 64 + ".*")))
    add_samples(workspace, [fifo, huge, claimed, counted])
    timeout = 3.0
    write_params(workspace, {"extract": {"decode_timeout": timeout, "max_source_frames": 2000, "workers": 2,
                                         "max_bad_fraction": 0.5}})
    elapsed = run_stage(workspace, limit_s=60)
    report = json.loads((workspace / "data/frames/report.json").read_text())
    reasons = {video: entry.get("reason") for video, entry in report["videos"].items()}
    assert reasons[fifo] == f"decode timed out (over extract.decode_timeout={timeout:g} s)"
    assert reasons[huge] == "claims 16000x16000 pixels, over extract.max_source_pixels=67108864"   # the default
    assert reasons[claimed] == "claims 3000 frames, over extract.max_source_frames=2000"
    assert reasons[counted] == "has at least 2001 frames, over extract.max_source_frames=2000"
    assert report["summary"] == {"videos": 28, "ok": 24, "quarantined": 4}   # every other video finished
    assert "decode_timeout" not in report["params"]   # limits are not what a decoded video depends on
    assert sorted(p.name for p in (workspace / "data/frames").iterdir() if "partial" in p.name) == []
    # the hung worker was held for its limit, then replaced: the stage did not wait on it much longer
    assert elapsed < timeout + 20, f"extract took {elapsed:.1f} s with decode_timeout={timeout}"


def stage_blocked_on_a_fifo(workspace, extract_params: dict, wait_s: float) -> tuple[subprocess.Popen, str, int]:
    """The extract stage started in the background on the workspace plus one sample whose video is a FIFO nobody
    writes: (the stage process, that video as samples.jsonl names it, the pid of the process blocked opening it)."""
    (video,) = add_samples(workspace, [add_hanging(workspace, "e" * 64 + ".mp4")])
    write_params(workspace, {"extract": {"workers": 2, "max_bad_fraction": 0.5, **extract_params}})
    process = subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=workspace,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while not (holder := fifo_opener(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert holder, "no decoding process opened the FIFO"
    return process, video, holder


def test_a_decoder_that_crashes_its_worker_costs_that_video_only(workspace, tmp_path):
    """A worker killed from outside (as a segfault in libav would end it) is reported, and the pool goes on."""
    process, video, holder = stage_blocked_on_a_fifo(workspace, {"decode_timeout": 60}, wait_s=60)
    os.kill(holder, signal.SIGKILL)
    assert process.wait(timeout=60) == 0
    report = json.loads((workspace / "data/frames/report.json").read_text())
    assert report["videos"][video]["reason"] == "decoder crashed (worker exit code -9)"
    assert report["summary"]["ok"] == 24


def test_a_killed_stage_keeps_its_finished_packs_and_the_rerun_gives_the_same_bytes(workspace):
    """The stage is killed (SIGKILL, with its workers) while it waits on a FIFO in the last group: the groups before
    it were packed, and the rerun keeps those packs untouched instead of decoding them again."""
    process, video, holder = stage_blocked_on_a_fifo(workspace, {"decode_timeout": 60}, wait_s=60)
    partial = workspace / "data/frames.partial"
    earlier = {Path(v).name[:2] for s in read_jsonl(workspace / "data/raw/samples.jsonl") for v in s["videos"]} - {"ee"}
    deadline = time.monotonic() + 30
    while len(list(partial.glob("*.done.json"))) < len({g for g in earlier if g < "ee"}):
        assert time.monotonic() < deadline, "the groups before the FIFO's were not packed"
        time.sleep(0.1)
    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        child.kill()
    process.wait(timeout=10)
    kept = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in partial.glob("*.tar")}
    assert kept and all(name[:2] < "ee" for name in kept)

    write_params(workspace, {"extract": {"workers": 2, "max_bad_fraction": 0.5, "decode_timeout": 2}})
    extract.main()                                     # decode_timeout is not an input of the packs: a resume
    frames = workspace / "data/frames"
    assert {name: (frames / name).stat().st_ino for name in kept} == {name: ino for name, (ino, _) in kept.items()}
    assert {name: (frames / name).stat().st_mtime_ns for name in kept} == {n: t for n, (_, t) in kept.items()}
    resumed = {path.name: sha256_file(path) for path in frames.iterdir()}
    shutil.rmtree(frames)
    extract.main()                                     # a clean run: the same files, the same bytes
    assert {path.name: sha256_file(path) for path in frames.iterdir()} == resumed
    assert json.loads((frames / "report.json").read_text())["videos"][video]["reason"].startswith("decode timed out")


def test_a_ray_worker_killed_mid_task_is_retried_by_ray_and_the_stage_completes(workspace):
    """The Ray worker running a task (and its decoding process, blocked on a FIFO) is killed as a lost node would
    end it: Ray runs the task again, the FIFO then times out as on the local engine, and every other video is done."""
    process, video, holder = stage_blocked_on_a_fifo(workspace, {"decode_timeout": 4, "engine": "ray"}, wait_s=90)
    task_worker = psutil.Process(holder).parent()
    assert "Decoder" in " ".join(task_worker.cmdline()), task_worker.cmdline()
    task_worker.kill()
    os.kill(holder, signal.SIGKILL)
    assert process.wait(timeout=120) == 0
    report = json.loads((workspace / "data/frames/report.json").read_text())
    assert report["videos"][video]["reason"] == "decode timed out (over extract.decode_timeout=4 s)"
    assert report["summary"] == {"videos": 25, "ok": 24, "quarantined": 1}


def test_a_hung_decoder_holds_its_worker_no_longer_than_decode_timeout(tmp_path, monkeypatch):
    """From the moment the worker blocks on the FIFO to the moment it is gone: within the limit, not past it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw/videos").mkdir(parents=True)
    os.mkfifo(tmp_path / "data/raw/videos/hung.tar")   # nobody writes: opening it blocks in the kernel
    stored = {"pack": "hung.tar", "offset": 0, "length": 4096}
    p = {"num_frames": 4, "frame_size": 16, "audio": False, "decode_timeout": 1.5}
    others = {child.pid for child in psutil.Process().children()}   # e.g. METEOR's Java, started by earlier tests
    with ProcessPool(max_workers=1) as pool:
        pool.schedule(len, ("warm",)).result()   # the worker is up before the clock starts
        (worker,) = [child for child in psutil.Process().children() if child.pid not in others]
        future = pool.schedule(extract.extract_one, (f"videos/{'a' * 64}.mp4", stored, None, None, p, tmp_path),
                               timeout=extract.pool_timeout(p["decode_timeout"]))
        while Path(f"/proc/{worker.pid}/wchan").read_text() != "wait_for_partner":
            time.sleep(0.001)
        blocked = time.monotonic()
        entry = extract.outcome(future, p, tmp_path / "x.safetensors")
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.001)
        held = time.monotonic() - blocked
    assert entry == {"status": "quarantined", "reason": "decode timed out (over extract.decode_timeout=1.5 s)"}
    assert 1.0 < held <= 1.5, f"the hung worker was held {held:.3f} s"


def fifo_opener(stage: int) -> int | None:
    """The worker of the stage process that is blocked opening a FIFO (the kernel's wait_for_partner), if any."""
    for child in psutil.Process(stage).children(recursive=True):
        try:
            if Path(f"/proc/{child.pid}/wchan").read_text() == "wait_for_partner":
                return child.pid
        except OSError:
            continue
    return None


@pytest.mark.parametrize("member, reason", [
    ("/etc/passwd", "path leaves the archive folder"),
    ("../../outside.png", "path leaves the archive folder"),
    ("frames/../../x.png", "path leaves the archive folder"),
    ("link", "links are refused"),
    ("hard", "links are refused"),
    ("fifo", "not a file (device or FIFO)"),
])
def test_frame_archives_with_escaping_names_or_links_are_quarantined(workspace, tmp_path, member, reason):
    tar_path = tmp_path / ("f" * 64 + ".tar")
    image = tmp_path / "frame.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(image, "000000.png")
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "hard":
            info.type, info.linkname = tarfile.LNKTYPE, "000000.png"
        elif member == "fifo":
            info.type = tarfile.FIFOTYPE
        data = image.read_bytes() if info.isfile() else b""
        info.size = len(data)
        tar.addfile(info, BytesIO(data))
    (video,) = add_samples(workspace, add_collected(workspace, [tar_path]))
    write_params(workspace, {"extract": {"max_bad_fraction": 0.5}})
    extract.main()
    entry = json.loads((workspace / "data/frames/report.json").read_text())["videos"][video]
    assert entry["status"] == "quarantined" and entry["reason"].endswith(reason)
    assert entry["reason"].startswith(f"frame archive member {member!r}")
