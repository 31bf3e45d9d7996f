"""Benchmark: our frame sampler against the decoders of the tools users run today, each peer installed from PyPI in
its own venv (bench/.peers/<peer>/), on the same files: N uniform frames at 224 x 224 px.

Decoders (the same frame indices for every one, where the peer takes indices):
- ours: stages.data.video.sample (PyAV, a packet index, seeks past GOPs, skips far non-reference frames, swscale);
- torchcodec's VideoDecoder, seek_mode "exact" and "approximate", get_frames_at(indices), then resized;
- qwen-vl-utils' fetch_video (nframes=N, resized 224 x 224), with the decord reader it recommends;
- LLaMA-Factory's PyAV loop, from the installed llamafactory package (its plugin's _regularize_videos: decode
  every frame, keep the sampled ones).
torchcodec needs FFmpeg's shared libraries, which this machine lacks: the bench links the ones PyAV's wheel ships
(FFmpeg 8) under their plain names in bench/.peers/ffmpeg-libs and hands torchcodec that folder. A peer that fails
to install or to run is recorded with the reason, never skipped silently.

Each decoder runs in its own process, one video at a time, ROUNDS rounds after a warm-up call; the median round
counts. Only the ratios mean something across machines: `decode.<kind>.ratio_vs_fastest_peer` is the fastest peer's
time divided by ours (goal: >= 1.5 on every kind).

    python bench/peers.py [--quick]       prints a table, writes bench/results/peers.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import av
import imageio_ffmpeg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages.data.video import open_video, pick_frames, probe, sample  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
PEERS_DIR = REPO / "bench/.peers"
FRAMES, SIDE, ROUNDS = 16, 224, 3
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]   # the project's pins, from this machine's disk
PEERS = {   # peer -> what its venv installs
    "torchcodec": [*TORCH, "torchcodec"],
    "qwen-vl-utils": [*TORCH, "qwen-vl-utils", "decord"],
    "llamafactory": [*TORCH, "llamafactory"],
}


def encode(path: Path, seconds: float, size: str, rate: int = 30, gop: int | None = None) -> Path:
    """A test-pattern H.264 video that changes every frame; gop None keeps x264's default keyframe interval (250)."""
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                    *(["-g", str(gop)] if gop else []), str(path)], check=True)
    return path


def corpus(folder: Path, quick: bool) -> dict[str, list[Path]]:
    """The kinds of video of the issue's first look, plus the short clips users train on most."""
    scale = 0.2 if quick else 1
    return {
        "short clips (10 s, 360p)": [encode(folder / f"short{i}.mp4", 10, "640x360") for i in range(2 if quick else 8)],
        "60 s 720p": [encode(folder / "hd.mp4", 60 * scale, "1280x720")],
        "5 min 360p": [encode(folder / "sd.mp4", 300 * scale, "640x360")],
        "25 min 128x72": [encode(folder / "tiny_long.mp4", 1500 * scale, "128x72")],
    }


def indices_of(path: Path) -> list[int]:
    container, stream = open_video(path)
    with container:
        return pick_frames(probe(container, stream).times, FRAMES).tolist()


# Each peer's decoder, run in its own venv: reads {"videos": [[path, indices]], "rounds"} on stdin, prints
# {"seconds": [per round], "shape": [...]} or {"error": ...}.
RUNNERS = {
    "torchcodec": """
        import torch
        from torchcodec.decoders import VideoDecoder
        from torchvision.transforms.v2.functional import resize
        def decode(path, indices, mode):
            frames = VideoDecoder(path, seek_mode=mode).get_frames_at(indices=indices).data   # uint8 [n, 3, h, w]
            return resize(frames, [SIDE, SIDE], antialias=True)
    """,
    "qwen-vl-utils": """
        import os
        os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
        from qwen_vl_utils import fetch_video
        def decode(path, indices, mode):
            return fetch_video({"type": "video", "video": path, "nframes": len(indices), "resized_height": SIDE,
                                "resized_width": SIDE})
    """,
    "llamafactory": """
        from llamafactory.data.mm_plugin import get_mm_plugin
        plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>", video_token="<|video_pad|>")
        def decode(path, indices, mode):
            # its own sampler: video_fps frames a second, at most video_maxlen; the fps asks for more than N, so
            # the cap gives N uniform frames, as the others decode
            out = plugin._regularize_videos([path], image_max_pixels=SIDE * SIDE, image_min_pixels=SIDE * SIDE,
                                            video_max_pixels=SIDE * SIDE, video_min_pixels=SIDE * SIDE,
                                            video_fps=1000.0, video_maxlen=len(indices))
            return out["videos"][0] if isinstance(out, dict) else out[0]
    """,
}
HARNESS = """
import json, statistics, sys, time
SIDE = {side}
{runner}
job = json.load(sys.stdin)
try:
    decode(*job["videos"][0], job["mode"])   # warm-up: imports, codec initialisation
    seconds, shape = [], None
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        for path, indices in job["videos"]:
            out = decode(path, indices, job["mode"])
        seconds.append(time.perf_counter() - start)
        shape = list(getattr(out, "shape", None) or [len(out)])
    print(json.dumps({{"seconds": seconds, "shape": shape}}))
except Exception as error:
    print(json.dumps({{"error": f"{{type(error).__name__}}: {{str(error)[-800:]}}"}}))
"""


def ffmpeg_libs() -> Path:
    """PyAV's bundled FFmpeg libraries under the sonames torchcodec looks for (libavutil.so.60, ...)."""
    folder = PEERS_DIR / "ffmpeg-libs"
    folder.mkdir(parents=True, exist_ok=True)
    bundled = Path(av.__file__).parent.parent / "av.libs"
    for lib in bundled.iterdir():
        name = lib.name.split("-")[0] + ".so." + lib.name.split(".so.")[1].split(".")[0]
        link = folder / name
        if not link.exists():
            link.symlink_to(lib)
    return folder


def setup(peer: str) -> dict:
    """The peer's venv, created and installed when missing: {"python": path} or {"error": the reason}."""
    venv = PEERS_DIR / peer
    python = venv / "bin/python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        out = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[peer]], capture_output=True,
                             text=True)
        if out.returncode:
            return {"error": f"pip install {' '.join(PEERS[peer])} failed: {out.stderr.strip()[-600:]}"}
        (venv / ".installed").write_text(subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True,
                                                        text=True).stdout)
    return {"python": str(python)}


def run_peer(peer: str, python: str, videos: list, mode: str | None) -> dict:
    code = HARNESS.format(side=SIDE, runner=textwrap.dedent(RUNNERS[peer]))
    bundled = Path(av.__file__).parent.parent / "av.libs"   # what the linked libraries themselves link to
    env = {**os.environ, "LD_LIBRARY_PATH": f"{ffmpeg_libs()}:{bundled}"} if peer == "torchcodec" else dict(os.environ)
    job = json.dumps({"videos": videos, "rounds": ROUNDS, "mode": mode})
    out = subprocess.run([python, "-c", code], input=job, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


def ours(videos: list) -> dict:
    plan = {"num_frames": FRAMES, "fps": 0, "min_frames": 4, "max_frames": 768, "frame_size": SIDE, "max_pixels": 0,
            "min_pixels": 0}
    sample(Path(videos[0][0]), plan)
    seconds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for path, indices in videos:
            out = sample(Path(path), plan)
            assert out.indices.tolist() == indices
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "shape": list(out.frames.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter videos, fewer clips")
    args = parser.parse_args()
    installed = {peer: setup(peer) for peer in PEERS}
    decoders = [("ours", None, None), ("torchcodec exact", "torchcodec", "exact"),
                ("torchcodec approximate", "torchcodec", "approximate"), ("qwen-vl-utils", "qwen-vl-utils", None),
                ("llamafactory", "llamafactory", None)]
    kinds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind, paths in corpus(Path(scratch), args.quick).items():
            videos = [[str(path), indices_of(path)] for path in paths]
            results = {}
            for name, peer, mode in decoders:
                if peer is None:
                    results[name] = ours(videos)
                elif "error" in installed[peer]:
                    results[name] = {"error": installed[peer]["error"]}
                else:
                    results[name] = run_peer(peer, installed[peer]["python"], videos, mode)
                if "seconds" in results[name]:
                    results[name]["median_s"] = statistics.median(results[name]["seconds"])
            timed = {name: r["median_s"] for name, r in results.items() if "median_s" in r and name != "ours"}
            fastest = min(timed, key=timed.get) if timed else None
            kinds[kind] = {"videos": len(paths), "decoders": results, "fastest_peer": fastest,
                           "ratio_vs_fastest_peer": timed[fastest] / results["ours"]["median_s"] if fastest else None}
    print(f"{'video kind':<26}" + "".join(f"{name:>24}" for name, _, _ in decoders) + f"{'ratio':>8}")
    for kind, k in kinds.items():
        cells = [f"{k['decoders'][name]['median_s']:.3f} s" if "median_s" in k["decoders"][name] else "failed"
                 for name, _, _ in decoders]
        ratio = f"{k['ratio_vs_fastest_peer']:.2f}x" if k["ratio_vs_fastest_peer"] else "-"
        print(f"{kind:<26}" + "".join(f"{cell:>24}" for cell in cells) + f"{ratio:>8}")
    for name, _, _ in decoders:
        errors = {k["decoders"][name].get("error") for k in kinds.values()} - {None}
        for error in errors:
            print(f"{name}: {error}")
    versions = {peer: (Path(i["python"]).parents[1] / ".installed").read_text() if "python" in i else i["error"]
                for peer, i in installed.items()}   # each venv's pip freeze, or why it did not install
    result = {"frames": FRAMES, "side": SIDE, "rounds": ROUNDS, "cpu_count": os.cpu_count(), "quick": args.quick,
              "pyav": av.__version__, "peers_installed": versions, "decode": kinds}
    out = REPO / "bench/results/peers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
