import io
import subprocess
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from stages.data.synthetic import render
from stages.data.video import (
    EXACT_BICUBIC,
    VideoError,
    frame_count,
    indexed,
    open_video,
    probe,
    read_audio,
    sample,
    sample_images,
    scanned,
    smart_resize,
    split_runs,
    uniform_indices,
)
from tests.helpers import FFMPEG, ffmpeg, make_video

SQUARE = {"num_frames": 4, "frame_size": 32}


def every_frame(path, height, width) -> list[np.ndarray]:
    """The reference: a plain sequential decode of every frame (no seeking, no packet index, no skipped frames),
    scaled as ffmpeg's `scale=width:height:flags=bicubic+accurate_rnd+bitexact` does."""
    with av.open(str(path)) as container:
        return [frame.reformat(width=width, height=height, format="rgb24", interpolation=EXACT_BICUBIC).to_ndarray()
                for frame in container.decode(video=0)]


def test_uniform_indices_cover_first_and_last_frame():
    assert uniform_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 2, 2]


def test_frame_count_follows_the_qwen_fps_rule():
    fps = {"fps": 2.0, "min_frames": 4, "max_frames": 768}
    assert frame_count(300, 10.0, fps) == 20                     # 10 s at 2 fps
    assert frame_count(300, 10.5, fps) == 20                     # 21 rounded down to an even count
    assert frame_count(30, 1.0, fps) == 4                        # at least min_frames
    assert frame_count(45000, 1500.0, fps) == 768                # 25 min: max_frames
    assert frame_count(3, 0.1, fps) == 2                         # never more than the video has (even)
    assert frame_count(300, 10.0, {"num_frames": 7}) == 7


@pytest.mark.parametrize("height, width, expected", [
    (1080, 1920, (560, 1008)),      # worked by hand from the qwen-vl-utils rule, max_pixels 768*28*28
    (480, 640, (476, 644)),         # under budget: each side rounded to the nearest multiple of 28
    (4000, 3000, (896, 672)),
    (1, 1, None),                   # too small: grown to min_pixels
])
def test_smart_resize_matches_the_published_rule(height, width, expected):
    h, w = smart_resize(height, width, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and 128 * 28 * 28 <= h * w <= 768 * 28 * 28
    assert abs(h / w - height / width) < 0.1 * height / width
    if expected:
        assert (h, w) == expected


def test_aspect_ratio_over_200_is_an_error():
    with pytest.raises(VideoError, match="aspect ratio"):
        smart_resize(2, 1000, 0, 10**6)


@pytest.fixture
def moving_square(tmp_path):
    """A white square travelling 32 px to the right over 2 s (16 frames at 8 fps) on a black 64x64 video."""
    clip = {"color": "white", "shape": "square", "direction": "right", "side": 12, "start": (4, 26),
            "velocity": (32, 0), "background": (0, 0, 0)}
    path = tmp_path / "square.mp4"
    render(clip, path, side=64, fps=8, seconds=2.0)
    return path


def test_frames_are_decoded_from_the_file(moving_square):
    sampled = sample(moving_square, SQUARE)
    assert sampled.frames.shape == (4, 32, 32, 3) and sampled.frames.dtype == np.uint8
    assert sampled.indices.tolist() == [0, 5, 10, 15]
    assert np.allclose(sampled.timestamps, [0, 5 / 8, 10 / 8, 15 / 8])
    assert sampled.info == {"codec": "h264", "width": 64, "height": 64, "fps": 8.0, "total_frames": 16,
                            "duration": 2.0, "rotation": 0, "decoded_frames": 10}
    # keyframes at 0 and 8: frames 0-5, a seek to 8, then 8-15 (6 and 7 never reached), and of those only the wanted
    # ones and those other frames refer to (x264's B-frames that are not references are skipped)
    # the square's centre moves right by 32 px * 15/16 of the clip, halved by the resize to 32 px
    centres = [np.argwhere(frame.mean(axis=2) > 128)[:, 1].mean() for frame in sampled.frames]
    assert np.all(np.diff(centres) > 0)
    assert centres[-1] - centres[0] == pytest.approx(32 * 15 / 16 / 2, abs=1.5)


def test_more_frames_than_the_video_has_repeats_frames(moving_square):
    sampled = sample(moving_square, {"num_frames": 20, "frame_size": 16})
    assert len(sampled.frames) == 20 and sampled.indices[0] == 0 and sampled.indices[-1] == 15


@pytest.mark.parametrize("codec, suffix, extra, size", [
    ("libvpx-vp9", ".webm", ("-deadline", "realtime", "-cpu-used", "8"), "64x48"),
    ("mpeg4", ".avi", (), "64x48"),
    ("libx265", ".mkv", ("-x265-params", "log-level=error"), "64x48"),
    ("libx264", ".mp4", ("-g", "250", "-bf", "3"), "64x48"),     # B-frames: decode order differs from display order
    ("libx264", ".mp4", ("-g", "250", "-bf", "3"), "1280x720"),  # the same on frame threads (open_video)
])
def test_codecs_give_the_frames_a_full_decode_gives(tmp_path, codec, suffix, extra, size):
    path = make_video(tmp_path / f"clip{suffix}", seconds=3, codec=codec, extra=extra, size=size)
    sampled = sample(path, {"num_frames": 5, "frame_size": 24})
    reference = every_frame(path, 24, 24)
    assert sampled.indices.tolist() == uniform_indices(len(reference), 5).tolist()
    for frame, index in zip(sampled.frames, sampled.indices):
        assert np.array_equal(frame, reference[index])


@pytest.mark.parametrize("gop, most_decoded", [(10, 8 * 10), (250, 0.6 * 6000)])
def test_long_video_is_sampled_by_seeking_and_skipping(tmp_path, gop, most_decoded):
    """10 minutes at 10 fps, 8 frames wanted. A keyframe every second: at most one GOP decoded per wanted frame.
    x264's default 250-frame GOPs with B-frames: the B-frames far from a wanted frame are skipped."""
    path = make_video(tmp_path / "long.mp4", seconds=600, size="32x32", rate=10, extra=("-g", str(gop)))
    sampled = sample(path, {"num_frames": 8, "frame_size": 16})
    assert sampled.info["total_frames"] == 6000
    assert sampled.info["decoded_frames"] <= most_decoded
    reference = every_frame(path, 16, 16)
    for frame, index in zip(sampled.frames, sampled.indices):
        assert np.array_equal(frame, reference[index])


@pytest.mark.parametrize("extra, size", [
    (("-g", "10"), "32x32"),                                                  # a keyframe every second
    (("-x264-params", "open_gop=1:keyint=20", "-bf", "3"), "32x32"),          # open GOPs: frames before their keyframe
    (("-g", "20", "-bf", "3"), "1280x720"),                                   # frame threads when a decoder is alone
])
def test_threads_decode_far_apart_frames_at_once_and_give_the_same_bytes(tmp_path, extra, size):
    path = make_video(tmp_path / "long.mp4", seconds=60 if size == "32x32" else 8, size=size, rate=10, extra=extra)
    p = {"num_frames": 8, "frame_size": 16}
    alone = sample(path, p)
    container, stream = open_video(path)
    with container:
        known = probe(container, stream)
    wanted = np.unique(known.times[alone.indices])
    runs = split_runs(wanted, known, threads=3)
    assert len(runs) == 3 and np.array_equal(np.concatenate(runs), wanted)
    shared = sample(path, p, threads=3)
    assert np.array_equal(shared.frames, alone.frames) and shared.info == alone.info
    reference = every_frame(path, 16, 16)
    for frame, index in zip(shared.frames, shared.indices):
        assert np.array_equal(frame, reference[index])


def test_one_long_gop_is_decoded_by_one_decoder(tmp_path):
    """Frames wanted from one 250-frame GOP and a short one after it: a second decoder would save little (one run)."""
    path = make_video(tmp_path / "short.mp4", seconds=30, size="32x32", rate=10, extra=("-g", "250"))
    container, stream = open_video(path)
    with container:
        known = probe(container, stream)
    assert len(known.keyframes) == 2
    assert len(split_runs(known.times[uniform_indices(300, 16)], known, threads=2)) == 1


def test_fps_mode_and_max_pixels(tmp_path):
    path = make_video(tmp_path / "wide.mp4", seconds=5, size="320x180", rate=10)
    sampled = sample(path, {"fps": 2.0, "min_frames": 4, "max_frames": 768, "max_pixels": 64 * 28 * 28,
                            "min_pixels": 0})
    # by hand: 168 x 308 is over 50176 pixels; scaled by sqrt(57600 / 50176) and floored to multiples of 28
    assert len(sampled.frames) == 10 and sampled.frames.shape[1:] == (168, 280, 3)
    assert np.allclose(np.diff(sampled.timestamps), 4.9 / 9, atol=0.06)


def test_variable_frame_rate_is_sampled_evenly_in_time(tmp_path):
    """Frames at 0-1 s every 0.04 s, then 1-4 s every 0.5 s: evenly spaced frame numbers would crowd the start."""
    path = make_video(tmp_path / "cfr.mp4", seconds=4, rate=25)
    vfr = tmp_path / "vfr.mkv"
    ffmpeg("-i", str(path), "-vf", "select='lt(t,1)+not(mod(n,12))'", "-fps_mode", "vfr", "-c:v", "libx264",
           str(vfr))
    sampled = sample(vfr, {"num_frames": 5, "frame_size": 16})
    assert np.all(np.abs(sampled.timestamps - np.linspace(0, sampled.timestamps[-1], 5)) < 0.3)
    assert sampled.timestamps[-1] > 3


def test_rotation_metadata_is_applied_as_ffmpeg_does(tmp_path):
    plain = make_video(tmp_path / "plain.mp4", seconds=1, size="56x28")   # multiples of 28: no scaling below
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated))
    sampled = sample(rotated, {"num_frames": 2, "max_pixels": 10**6, "min_pixels": 0, "frame_size": 0})
    assert sampled.info["rotation"] == 90 and sampled.frames.shape[1:] == (56, 28, 3)    # portrait now
    upright = subprocess.run([FFMPEG, "-loglevel", "error", "-sws_flags", "bicubic+accurate_rnd+bitexact",
                              "-i", str(rotated), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                             check=True, capture_output=True).stdout
    expected = np.frombuffer(upright, np.uint8).reshape(56, 28, 3).astype(int)
    ours = sampled.frames[0].astype(int)
    # ffmpeg turns the 4:2:0 picture, then interpolates chroma; we convert (bit-exactly), then turn: the chroma of
    # testsrc2's sharp colour edges lands about half a sample apart, a few grey levels on average. Any wrong
    # orientation is tens of levels off.
    assert np.abs(ours - expected).mean() < 8
    for wrong in (ours[::-1, ::-1], ours[::-1], ours[:, ::-1]):
        assert np.abs(wrong - expected).mean() > 40


@pytest.mark.parametrize("size, source", [("1x1", "color=c=red:"), ("4000x3000", "testsrc="), ("33x17", "testsrc=")])
def test_extreme_and_odd_sizes(tmp_path, size, source):
    path = make_video(tmp_path / "odd.mkv", seconds=1, size=size, rate=4, extra=("-pix_fmt", "yuv444p"),
                      source=source)
    sampled = sample(path, {"num_frames": 2, "frame_size": 16})
    assert sampled.frames.shape == (2, 16, 16, 3)
    assert (sampled.info["width"], sampled.info["height"]) == tuple(map(int, size.split("x")))


@pytest.mark.parametrize("content, reason", [(b"", "cannot open"), (b"this is text, not a video\n" * 50,
                                                                    "cannot open")])
def test_broken_files_raise_video_error(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=reason):
        sample(path, SQUARE)


def test_a_codec_without_a_decoder_is_a_video_error_not_a_crash(tmp_path):
    """The MPEG-4 FourCC of an AVI renamed to one libav does not know: PyAV gives the stream no codec context (found
    by tests/test_fuzz.py, where it raised AttributeError out of extract)."""
    path = make_video(tmp_path / "a.avi", seconds=1, size="32x24", codec="mpeg4")
    path.write_bytes(path.read_bytes().replace(b"FMP4", b"ZZZZ"))
    with pytest.raises(VideoError, match="^no decoder for the video stream's codec$"):
        sample(path, SQUARE)


@pytest.mark.parametrize("claim, reason", [
    ("W16000 H16000", "claims 16000x16000 pixels, over extract.max_source_pixels=67108864"),
    ("W9000 H9000", "claims 9000x9000 pixels, over extract.max_source_pixels=67108864"),
])
def test_a_header_claiming_huge_frames_is_refused_before_decoding(tmp_path, claim, reason):
    path = tmp_path / "huge.y4m"
    path.write_bytes(f"YUV4MPEG2 {claim} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(999))
    with pytest.raises(VideoError, match=f"^{reason}$"):
        sample(path, {**SQUARE, "max_source_pixels": 8192 * 8192})


def test_truncated_file_raises_video_error(moving_square):
    data = moving_square.read_bytes()
    moving_square.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError):
        sample(moving_square, SQUARE)


def test_audio_only_file_has_no_video_stream_but_its_audio_reads_at_16k(tmp_path):
    path = tmp_path / "tone.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", "2", "-ac", "2", str(path))
    with pytest.raises(VideoError, match="no video stream"):
        sample(path, SQUARE)
    audio = read_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 32000) < 1600
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5      # still a 440 Hz tone after resampling


def test_frames_from_an_image_archive(tmp_path):
    archive = tmp_path / "frames.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(10):
            data = io.BytesIO()
            Image.new("RGB", (40, 30), (index * 25, 0, 0)).save(data, format="PNG")
            info = tarfile.TarInfo(f"{index:06d}.png")
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    with open(archive, "rb") as file:
        sampled = sample_images(file, {"num_frames": 4, "frame_size": 8}, duration=5.0)
    assert sampled.indices.tolist() == [0, 3, 6, 9]
    assert sampled.frames[:, 0, 0, 0].tolist() == [0, 75, 150, 225]
    assert np.allclose(sampled.timestamps, [0, 1.5, 3.0, 4.5])


def test_a_wanted_frame_skipped_by_mistake_is_decoded_again(tmp_path, monkeypatch):
    """With every non-reference frame skipped, wanted or not (as a decoder that applied skip_frame late would), the
    wanted B-frames go missing on the first pass; the sampler must notice and decode them again."""
    import stages.data.video

    path = make_video(tmp_path / "bframes.mp4", seconds=4, extra=("-g", "250", "-bf", "3"))
    monkeypatch.setattr(stages.data.video, "skipped", lambda pts, wanted: True)
    sampled = sample(path, {"num_frames": 7, "frame_size": 24})
    reference = every_frame(path, 24, 24)
    for frame, index in zip(sampled.frames, sampled.indices):
        assert np.array_equal(frame, reference[index])
    assert sampled.info["decoded_frames"] > len(reference) / 2    # the second passes cost decoding, as they must


# The demuxer's index, where it is trusted, must say exactly what reading every packet says.
INDEX_CASES = {   # name: (ffmpeg output options, whether the index is used)
    "x264 with B-frames": (("-c:v", "libx264", "-g", "20"), True),
    "x264 open GOP": (("-c:v", "libx264", "-x264-params", "open_gop=1:keyint=20", "-bf", "3"), True),
    "x264 without B-frames": (("-c:v", "libx264", "-bf", "0", "-g", "20"), True),
    "mpeg4 in avi": (("-c:v", "mpeg4", "-g", "20"), True),
    "variable frame rate": (("-c:v", "libx264", "-vf", "select='lt(n,6)+not(mod(n,3))'", "-fps_mode", "vfr"), False),
    "vp9 in webm (cues hold keyframes only)": (("-c:v", "libvpx-vp9", "-deadline", "realtime"), False),
}


@pytest.mark.parametrize("name", list(INDEX_CASES))
def test_the_index_gives_what_reading_every_packet_gives_or_is_not_used(tmp_path, name):
    options, uses_index = INDEX_CASES[name]
    suffix = ".webm" if "webm" in name else ".avi" if "avi" in name else ".mp4"
    path = tmp_path / f"clip{suffix}"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-t", "4", *options, str(path))
    edited = tmp_path / f"edited{suffix}"   # an edit list: the first 1.3 s cut without re-encoding
    ffmpeg("-ss", "1.3", "-i", str(path), "-c", "copy", str(edited))
    for video, expected in ((path, uses_index), (edited, uses_index and suffix == ".avi")):
        container, stream = open_video(video)
        with container:
            from_index = indexed(container, stream, {})
            assert (from_index is not None) == expected, video.name
        container, stream = open_video(video)   # indexed moved the demuxer: probe from the start, as callers do
        with container:
            known = probe(container, stream)
        fresh, stream = open_video(video)
        with fresh:
            times, keyframes = scanned(fresh, stream, {})
            base = float(stream.time_base)
        assert np.array_equal(known.times, np.sort(np.asarray(times, dtype=np.float64)) * base)
        assert np.array_equal(known.keyframes, np.sort(np.asarray(keyframes, dtype=np.float64)) * base)
        if from_index is not None:
            assert np.array_equal(np.sort(from_index[0]), np.sort(times)) and sorted(from_index[1]) == sorted(keyframes)


@pytest.mark.parametrize("name", ["x264 open GOP", "variable frame rate"])
def test_probe_reads_the_whole_video_wherever_the_demuxer_stands(tmp_path, name):
    """probe checks the index against packets on the caller's own demuxer, and scans through a handle of its own
    where the check fails: a demuxer already at the end still gives every frame."""
    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-t", "4", *INDEX_CASES[name][0], str(path))
    fresh, stream = open_video(path)
    with fresh:
        expected = probe(fresh, stream)
    drained, stream = open_video(path)
    with drained:
        for _ in drained.demux(stream):
            pass
        known = probe(drained, stream)
    assert np.array_equal(known.times, expected.times) and np.array_equal(known.keyframes, expected.keyframes)
