import itertools

import numpy as np
import pytest
from PIL import Image

from stages.data.synthetic import STEP, draw
from stages.results import motion

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def hand_drawn(color: str, direction: str, shape: str = "square", frames: int = 4, side: int = 32,
               background=(30, 50, 20), travel: float = 10.0) -> np.ndarray:
    """A clip drawn by the synthetic set's own painter: the shape starts mid-frame and travels `travel` px."""
    dx, dy = STEP[direction]
    clip = {"color": color, "shape": shape, "side": 10, "background": background,
            "start": (11 - dx * travel / 2, 11 - dy * travel / 2), "velocity": (dx * travel, dy * travel)}
    return np.stack([draw(clip, side, i / (frames - 1), 1.0) for i in range(frames)])


@pytest.mark.parametrize("color,direction,shape", [
    (c, d, s) for (c, d), s in zip(itertools.product(COLORS, STEP), itertools.cycle(["square", "circle", "triangle"]))])
def test_the_analyser_reads_the_colour_and_direction_of_hand_drawn_clips(color, direction, shape):
    assert motion.analyse(hand_drawn(color, direction, shape), COLORS) == (color, direction)


def test_a_still_blank_or_one_frame_blob_names_nothing():
    still = hand_drawn("red", "left", travel=0.0)
    assert motion.analyse(still, COLORS) == ("red", None)
    blank = np.full((4, 32, 32, 3), 40, dtype=np.uint8)
    assert motion.analyse(blank, COLORS) == (None, None)
    once = blank.copy()
    once[0, 10:20, 10:20] = (220, 40, 40)
    assert motion.analyse(once, COLORS) == ("red", None)


def test_the_background_may_be_any_of_the_synthetic_greys_and_the_colour_is_the_nearest_asked():
    clip = hand_drawn("orange", "down", background=(70, 0, 70))
    assert motion.analyse(clip, COLORS) == ("orange", "down")
    assert motion.analyse(clip, ["red", "blue"]) == ("red", "down")   # nearest of the colours asked about


def test_score_counts_what_was_read_against_what_was_asked():
    clips = np.stack([hand_drawn("red", "left"), hand_drawn("blue", "up"), hand_drawn("red", "right")])
    asked = [{"color": "red", "direction": "left"}, {"color": "blue", "direction": "down"},
             {"color": "blue", "direction": "right"}]
    accuracy, read = motion.score(clips, asked)
    assert accuracy == {"color_accuracy": pytest.approx(2 / 3), "direction_accuracy": pytest.approx(2 / 3)}
    assert read[1] == {"color": "blue", "direction": "up"}


def test_the_frechet_distance_is_zero_for_the_same_frames_and_grows_with_a_shift_in_colour():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (40, 4, 16, 16, 3), dtype=np.uint8)
    assert motion.frechet_distance(clips, clips) == pytest.approx(0, abs=1e-6)
    darker = (clips * 0.5).astype(np.uint8)
    darkest = (clips * 0.1).astype(np.uint8)
    assert 0 < motion.frechet_distance(clips, darker) < motion.frechet_distance(clips, darkest)


def test_a_strip_puts_the_frames_side_by_side_enlarged(tmp_path):
    clip = hand_drawn("green", "right")
    motion.save_strip(clip, tmp_path / "strip.png", scale=2)
    image = np.asarray(Image.open(tmp_path / "strip.png"))
    assert image.shape == (64, 4 * 64, 3)
    assert np.array_equal(image[::2, ::2], np.concatenate(list(clip), axis=1))
