import numpy as np
import pytest

from stages.collect import render
from stages.video import VideoError, sample_uniform, uniform_indices


def test_uniform_indices_cover_first_and_last_frame():
    assert uniform_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 2, 2]


@pytest.fixture
def moving_square(tmp_path):
    """A white square travelling 32 px to the right over 2 s (16 frames at 8 fps) on a black 64x64 video."""
    clip = {"color": "white", "shape": "square", "direction": "right", "side": 12, "start": (4, 26),
            "velocity": (32, 0), "background": (0, 0, 0)}
    path = tmp_path / "square.mp4"
    render(clip, path, size=64, fps=8, seconds=2.0)
    return path


def test_frames_are_decoded_from_the_file(moving_square):
    sampled = sample_uniform(moving_square, 4, 32)
    assert sampled.frames.shape == (4, 32, 32, 3) and sampled.frames.dtype == np.uint8
    assert sampled.indices.tolist() == [0, 5, 10, 15]
    assert np.allclose(sampled.timestamps, [0, 5 / 8, 10 / 8, 15 / 8])
    assert sampled.info == {"codec": "h264", "width": 64, "height": 64, "fps": 8.0, "total_frames": 16}
    # the square's centre moves right by 32 px * 15/16 of the clip, halved by the resize to 32 px
    centres = [np.argwhere(frame.mean(axis=2) > 128)[:, 1].mean() for frame in sampled.frames]
    assert np.all(np.diff(centres) > 0)
    assert centres[-1] - centres[0] == pytest.approx(32 * 15 / 16 / 2, abs=1.5)


def test_more_frames_than_the_video_has_repeats_frames(moving_square):
    sampled = sample_uniform(moving_square, 20, 16)
    assert len(sampled.frames) == 20 and sampled.indices[0] == 0 and sampled.indices[-1] == 15


@pytest.mark.parametrize("content, reason", [(b"", "cannot open"), (b"this is text, not a video\n" * 50,
                                                                    "cannot open")])
def test_broken_files_raise_video_error(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=reason):
        sample_uniform(path, 4, 32)


def test_truncated_file_raises_video_error(moving_square):
    data = moving_square.read_bytes()
    moving_square.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError):
        sample_uniform(moving_square, 4, 32)
