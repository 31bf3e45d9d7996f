"""The data stages give the same bytes on any x86-64 CPU: proven on this one by running them twice, once as they
are and once with every SIMD path switched off.

- ffmpeg (the imageio-ffmpeg binary that encodes the synthetic clips) runs through a wrapper that adds `-cpuflags 0`
  (libav*'s SIMD off) and `asm=0` to the `-x264-params` it was given (x264's assembly off).
- PyAV (which decodes and scales in extract) gets `av_force_cpu_flags(0)` from the libavutil it loaded, set in a
  sitecustomize module before any stage code runs, in every Python process, the extract workers included.

Without the bit-exact settings (stages.data.synthetic.X264_EXACT, our own RGB -> YUV conversion, and
stages.data.video.EXACT_BICUBIC) the two runs differ.
"""
import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg

from tests.helpers import REPO, SMALL, make_video, write_params

DATA = ("data/raw", "data/frames", "data/manifest")

SITECUSTOMIZE = """
import ctypes, glob, os
import av
libavutil, = glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libavutil-*"))
ctypes.CDLL(libavutil).av_force_cpu_flags(0)
"""

FFMPEG_WRAPPER = """#!{python}
# ffmpeg with libav*'s SIMD off and x264's assembly off; logs each call so the test can tell it ran
import os, sys
args = sys.argv[1:]
if "-x264-params" in args:
    at = args.index("-x264-params") + 1
    args[at] += ":asm=0"
else:
    args[-1:-1] = ["-x264-params", "asm=0"]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
os.execv({ffmpeg!r}, [{ffmpeg!r}, "-cpuflags", "0", *args])
"""


def without_simd(folder: Path) -> dict:
    """Environment for a stage process with no SIMD anywhere in its video code."""
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    wrapper = folder / "ffmpeg-no-simd"
    wrapper.write_text(FFMPEG_WRAPPER.format(python=sys.executable, log=str(folder / "ffmpeg.log"),
                                             ffmpeg=imageio_ffmpeg.get_ffmpeg_exe()))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return {"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "IMAGEIO_FFMPEG_EXE": str(wrapper)}


def run_data_stages(folder: Path, env: dict) -> dict[str, str]:
    """collect, extract and manifest in `folder`; the sha256 of every file they wrote."""
    write_params(folder, SMALL)
    for stage in ("collect", "extract", "manifest"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), **env})
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for out in DATA for path in sorted((folder / out).rglob("*")) if path.is_file()}


def test_data_stages_give_the_same_bytes_with_simd_off(tmp_path):
    plain, lowered = tmp_path / "simd", tmp_path / "no-simd"
    plain.mkdir()
    lowered.mkdir()
    env = without_simd(lowered)
    # the switches really are on in the lowered run
    flags = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import ctypes, glob, os, av
        libavutil, = glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libavutil-*"))
        print(ctypes.CDLL(libavutil).av_get_cpu_flags())""")], env={**os.environ, **env}, capture_output=True,
        text=True, check=True).stdout
    assert flags.strip() == "0"

    expected, got = run_data_stages(plain, {}), run_data_stages(lowered, env)
    calls = (lowered / "ffmpeg.log").read_text().splitlines()
    assert len(calls) == 2 * 2 * 2 * 3 and all("asm=0" in call for call in calls)   # every clip went through it
    assert len(expected) > 50 and expected.keys() == got.keys()
    differing = sorted(name for name in expected if expected[name] != got[name])
    assert differing == [], f"{len(differing)} files differ with SIMD off, e.g. {differing[:5]}"


SAMPLE = """
import hashlib, sys
from stages.data.video import sample
for path in sys.argv[1:]:
    for size in ({"frame_size": 48}, {"frame_size": 64}, {"frame_size": 0, "max_pixels": 224 * 224, "min_pixels": 0}):
        frames = sample(path, {"num_frames": 8, **size}).frames
        print(path, frames.shape, hashlib.sha256(frames.tobytes()).hexdigest())
"""


def test_frame_sampling_gives_the_same_bytes_with_simd_off(tmp_path):
    """Scaling and colour conversion of busy pictures (the synthetic clips are flat colours, where fewer roundings
    differ): 4:2:0, 4:2:2 and 10-bit sources, down-scaled, up-scaled, and kept at their size (colour conversion
    alone, which differs without the bit-exact flags)."""
    videos = [str(make_video(tmp_path / "420.mp4", size="320x240")), str(make_video(tmp_path / "64.mp4", size="64x64")),
              str(make_video(tmp_path / "422.mp4", size="176x144", extra=("-pix_fmt", "yuv422p"))),
              str(make_video(tmp_path / "10bit.mkv", size="160x96", extra=("-pix_fmt", "yuv420p10le")))]
    env = without_simd(tmp_path)
    outputs = [subprocess.run([sys.executable, "-c", SAMPLE, *videos], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), **extra}).stdout for extra in ({}, env)]
    assert outputs[0].count("\n") == 12 and outputs[0] == outputs[1]
