"""GRPO's rewards (stages/training/rewards.py): the built-in ones on hand-made answers, a user's function from the
rewards/ folder, and the checks that stop a stage on a reward that fails."""
import math

import pytest

from stages.training import rewards

ROWS = [{"id": "clip-1", "target": "a red circle moves left",
         "attributes": {"color": "red", "shape": "circle", "direction": "left"}},
        {"id": "clip-2", "target": "a blue square moves up",
         "attributes": {"color": "blue", "shape": "square", "direction": "up"}}]


def test_attribute_reward_is_the_share_of_attributes_named_right():
    answers = ["a red circle moves left", "a blue circle moves down"]
    assert rewards.attribute(answers, ROWS) == [1.0, pytest.approx(1 / 3)]
    # the first word that names an attribute counts: "red" before "blue" is a wrong color for clip-2
    assert rewards.attribute(["x", "a red blue square moves up"], ROWS) == [0.0, pytest.approx(2 / 3)]


def test_caption_rewards_rank_the_reference_above_a_wrong_answer():
    right, wrong = [row["target"] for row in ROWS], ["a dog", "the sky is green"]
    for reward in (rewards.cider_d, rewards.meteor):
        high, low = reward(right, ROWS), reward(wrong, ROWS)
        assert all(h > w for h, w in zip(high, low)) and len(high) == 2, reward.__name__


def test_format_reward_wants_plain_words_no_longer_than_twice_the_reference():
    answers = ["a red circle moves left", "<b>a blue square</b>"]
    assert rewards.answer_format(answers, ROWS) == [1.0, 0.0]
    assert rewards.answer_format(["a red circle " * 4, ""], ROWS) == [0.0, 0.0]


def test_a_users_reward_is_imported_from_the_rewards_folder():
    brevity = rewards.RowReward("rewards.brevity:score", ROWS)
    assert brevity.__name__ == "rewards.brevity:score"
    answers = ["a red circle moves left", "up"]
    assert brevity(prompts=None, completions=answers, index=[0, 1]) == [1.0, pytest.approx(0.2)]


@pytest.mark.parametrize("name", ["accuracy", "os:getcwd", "rewards.missing:score", "rewards.brevity:missing"])
def test_an_unknown_reward_stops_before_any_work_naming_the_built_in_ones(name):
    with pytest.raises(SystemExit, match=r"align_vlm.rewards: (unknown reward .*built in: attribute, cider_d, meteor, "
                                         r"format|cannot load)"):
        rewards.resolve(name)


def test_a_reward_that_raises_stops_with_the_row_ids_and_its_traceback(monkeypatch):
    def broken(answers, rows):
        raise KeyError("caption")

    monkeypatch.setitem(rewards.BUILT_IN, "broken", broken)
    with pytest.raises(rewards.RewardError, match=r"(?s)reward broken raised on rows \[clip-2, clip-1\].*"
                                                  r"Traceback.*in broken.*KeyError: 'caption'"):
        rewards.RowReward("broken", ROWS)(prompts=None, completions=["a", "b"], index=[1, 0])


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"returned 1 values for 2 answers \(rows \[clip-1, clip-2\]\)"),
    ([1.0, math.nan], r"returned nan for row clip-2: expected a number"),
    ([1.0, "high"], r"returned 'high' for row clip-2: expected a number"),
])
def test_a_reward_of_the_wrong_length_or_nan_stops_with_the_row(monkeypatch, returned, message):
    monkeypatch.setitem(rewards.BUILT_IN, "odd", lambda answers, rows: returned)
    with pytest.raises(rewards.RewardError, match=message):
        rewards.RowReward("odd", ROWS)(prompts=None, completions=["a", "b"], index=[0, 1])
