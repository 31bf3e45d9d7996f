"""Benchmark: our frame sampler (stages.data.video, PyAV with a packet index and seeking) against the ffmpeg CLI.

The baseline is what users script today: one ffmpeg process per video (the binary imageio-ffmpeg ships), a `select`
filter for the same frame numbers, scaled to the same size, raw RGB on stdout. Both run one video at a time and let
ffmpeg choose its threads. Video kinds: many short clips, and 10-minute videos with a keyframe every second and with
x264's default keyframe interval (250 frames). Then the no-op `dvc repro` time with 10,000 small videos collected.

    python bench/extract.py [--quick]      prints a table, writes bench/results/extract.json
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.data.video import open_video, pick_frames, probe, sample  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
REPO = Path(__file__).resolve().parents[1]
PLAN = {"num_frames": 16, "frame_size": 224}
ROUNDS = 3


def encode(path: Path, seconds: int, gop: int | None, size="640x360", rate=30) -> Path:
    """A test-pattern video (changes every frame); gop None keeps x264's default keyframe interval (250)."""
    gop_args = ["-g", str(gop)] if gop else []
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", *gop_args,
                    str(path)], check=True)
    return path


def corpus(folder: Path, quick: bool) -> dict[str, list[Path]]:
    long_seconds = 120 if quick else 600
    return {
        "short (10 s, GOP 250)": [encode(folder / f"short{i}.mp4", 10, None) for i in range(4 if quick else 24)],
        f"long ({long_seconds // 60} min, GOP 30)": [encode(folder / "long_gop30.mp4", long_seconds, 30)],
        f"long ({long_seconds // 60} min, GOP 250)": [encode(folder / "long_gop250.mp4", long_seconds, None)],
    }


def frame_numbers(path: Path) -> np.ndarray:
    container, stream = open_video(path)
    with container:
        return pick_frames(probe(container, stream).times, PLAN["num_frames"])


def ffmpeg_frames(path: Path, indices: np.ndarray) -> np.ndarray:
    """The baseline: one ffmpeg process decoding the video with a select filter for `indices`."""
    side = PLAN["frame_size"]
    chosen = "+".join(f"eq(n\\,{i})" for i in np.unique(indices))
    out = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(path), "-vf",
                          f"select='{chosen}',scale={side}:{side}:flags=bicubic", "-fps_mode", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, side, side, 3)


def time_kind(paths: list[Path]) -> dict:
    indices = {path: frame_numbers(path) for path in paths}   # both sides get the same frame numbers
    ours, theirs, difference = [], [], []
    for _ in range(ROUNDS):   # alternate, so that drift on the machine hits both sides alike
        start = time.perf_counter()
        sampled = {path: sample(path, PLAN) for path in paths}
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline = {path: ffmpeg_frames(path, indices[path]) for path in paths}
        theirs.append(time.perf_counter() - start)
    for path in paths:
        assert sampled[path].indices.tolist() == indices[path].tolist()
        unique = np.unique(indices[path], return_index=True)[1]
        assert len(baseline[path]) == len(unique), f"{path.name}: ffmpeg gave {len(baseline[path])} frames"
        difference.append(np.abs(sampled[path].frames[unique].astype(int) - baseline[path]).mean())
        assert difference[-1] < 3, f"{path.name}: frames differ from ffmpeg's by {difference[-1]:.1f} on average"
    decoded = sum(sampled[path].info["decoded_frames"] for path in paths)
    total = sum(sampled[path].info["total_frames"] for path in paths)
    return {"videos": len(paths), "ours_s": statistics.median(ours), "ffmpeg_s": statistics.median(theirs),
            "speedup": statistics.median(theirs) / statistics.median(ours), "decoded_fraction": decoded / total,
            "mean_abs_pixel_difference": float(np.mean(difference))}


def tiny_videos(folder: Path, count: int) -> None:
    """`count` distinct 4-frame 16x16 H.264 clips, encoded in-process (an ffmpeg process each would take minutes)."""
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        with av.open(str(folder / f"{index:05d}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=4, options={"threads": "1"})
            stream.width = stream.height = 16
            for step in range(4):
                pixels = np.full((16, 16, 3), step * 60, np.uint8)
                for bit in range(16):   # the index in binary, one 4x4 block per bit: every clip differs
                    pixels[bit // 4 * 4:bit // 4 * 4 + 4, bit % 4 * 4:bit % 4 * 4 + 4, 0] = 255 * (index >> bit & 1)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode(None))
        rows.append({"video": f"{index:05d}.mp4", "question": "What is shown?", "caption": f"clip {index}"})
    (folder / "annotations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def noop_repro(count: int) -> dict:
    """Seconds of a no-op `dvc repro` (whole pipeline) with `count` small videos collected, median of 3."""
    from ruamel.yaml import YAML

    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch) / "repo"
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, text=True, check=True)
        for name in filter(None, listed.stdout.split("\0")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
        tiny_videos(repo / "data/sources/tiny", count)
        yaml = YAML()
        params = yaml.load((repo / "params.yaml").read_text())
        params["collect"]["sources"] = [{"kind": "local", "folder": "data/sources/tiny",
                                         "annotations": "annotations.jsonl"}]
        params["collect"].update(val_fraction=0.005, test_fraction=0.005)
        params["extract"].update(num_frames=2, frame_size=16)
        params["train_vlm"].update(max_steps=2, save_steps=0)
        params["train_seq2seq"].update(max_steps=2, save_steps=0)
        with open(repo / "params.yaml", "w") as f:
            yaml.dump(params, f)
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        for command in (["git", "init", "-q"], ["git", "add", "-A"],
                        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
            subprocess.run(command, cwd=repo, check=True)
        start = time.perf_counter()
        out = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        first = time.perf_counter() - start
        if out.returncode:
            raise SystemExit(f"dvc repro failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            out = subprocess.run(["dvc", "repro"], cwd=repo, check=True, env=env, capture_output=True, text=True)
            timings.append(time.perf_counter() - start)
            assert "Running stage" not in out.stdout, out.stdout
        files = len(json.loads((repo / "data/raw/videos/index.json").read_text()))
    return {"videos": files, "first_repro_s": first, "noop_repro_s": statistics.median(timings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-minute long videos, 1,000 for the no-op repro")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        kinds = {name: time_kind(paths) for name, paths in corpus(Path(scratch), args.quick).items()}
    ours, theirs = sum(k["ours_s"] for k in kinds.values()), sum(k["ffmpeg_s"] for k in kinds.values())
    print(f"{'video kind':<26} {'videos':>6} {'ours s':>8} {'ffmpeg s':>9} {'speedup':>8} {'decoded':>8} {'diff':>5}")
    for name, k in kinds.items():
        print(f"{name:<26} {k['videos']:>6} {k['ours_s']:>8.2f} {k['ffmpeg_s']:>9.2f} {k['speedup']:>7.2f}x "
              f"{k['decoded_fraction']:>7.1%} {k['mean_abs_pixel_difference']:>5.2f}")
    print(f"{'all':<26} {'':>6} {ours:>8.2f} {theirs:>9.2f} {theirs / ours:>7.2f}x   (goal >= 1.5x)")
    noop = noop_repro(1000 if args.quick else 10000)
    print(f"no-op dvc repro with {noop['videos']} videos: {noop['noop_repro_s']:.2f} s (goal <= 2 s); "
          f"first run {noop['first_repro_s']:.0f} s")
    result = {"plan": PLAN, "rounds": ROUNDS, "cpu_count": os.cpu_count(), "quick": args.quick,
              "ffmpeg": imageio_ffmpeg.get_ffmpeg_version(), "pyav": av.__version__, "kinds": kinds,
              "speedup_vs_ffmpeg": theirs / ours, "noop_repro": noop}
    out = REPO / "bench/results/extract.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
