"""What GRPO rewards (align_vlm.rewards): built-in rewards by name, or a user's function named `module:function`.

Every reward has one contract, `Reward`: the sampled answers and the manifest rows they answer -> one float per
answer. `RowReward` adapts one to trl's reward-function call and checks what it returns: a reward that raises,
returns NaN or returns the wrong number of values stops the stage, naming the reward and the row.

A user's reward lives in a module under rewards/ (a DVC dependency of align_vlm, so that editing it reruns the stage):
`rewards: [rewards.length:score]` imports rewards/length.py and calls its `score(answers, rows)`.
"""
import importlib
import math
import re
import traceback
from typing import Protocol

from pycocoevalcap.cider.cider import Cider

from stages.results import metrics

USER_REWARDS = "rewards"   # the package (a folder at the repository root) that users' reward modules live in


class Reward(Protocol):
    def __call__(self, answers: list[str], rows: list[dict]) -> list[float]:
        """One reward per answer; answers[i] answers rows[i]."""


def attribute(answers: list[str], rows: list[dict]) -> list[float]:
    """The share of the row's ground-truth attributes (synthetic set: color, shape, direction) that the answer names
    right: the first word that is a known value of an attribute must be the true one."""
    vocabulary = {name: {row["attributes"][name] for row in rows} for name in rows[0]["attributes"]}
    rewards = []
    for answer, row in zip(answers, rows):
        said = metrics.read_attributes(answer, vocabulary)
        rewards.append(sum(said[name] == value for name, value in row["attributes"].items()) / len(vocabulary))
    return rewards


def cider_d(answers: list[str], rows: list[dict]) -> list[float]:
    """Each answer's CIDEr-D against its reference, with the batch's references as the corpus (its n-gram weights),
    on CIDEr-D's 0-10 scale."""
    references, predictions = metrics._coco_inputs(answers, [row["target"] for row in rows])
    return [float(score) for score in Cider().compute_score(references, predictions)[1]]


def meteor(answers: list[str], rows: list[dict]) -> list[float]:
    """Each answer's METEOR 1.5 against its reference, 0-1."""
    references, predictions = metrics._coco_inputs(answers, [row["target"] for row in rows])
    return [float(score) for score in metrics._meteor().compute_score(references, predictions)[1]]


def answer_format(answers: list[str], rows: list[dict]) -> list[float]:
    """1 for an answer of words (letters, digits, spaces and light punctuation) no longer than twice its reference,
    else 0: it penalises rambling and markup, which the caption metrics reward by chance."""
    plain = re.compile(r"[\w ,.'-]+")
    return [float(bool(plain.fullmatch(answer.strip())) and
                  len(answer.split()) <= 2 * len(row["target"].split())) for answer, row in zip(answers, rows)]


BUILT_IN: dict[str, Reward] = {"attribute": attribute, "cider_d": cider_d, "meteor": meteor, "format": answer_format}


def resolve(name: str) -> Reward:
    """A built-in reward by name, or `rewards.<module>:<function>` from the rewards/ folder."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, _, function = name.partition(":")
    if not function or module.split(".")[0] != USER_REWARDS:
        raise SystemExit(f"align_vlm.rewards: unknown reward {name!r}; built in: {', '.join(BUILT_IN)}, or "
                         f"{USER_REWARDS}.<module>:<function> for a function in {USER_REWARDS}/<module>.py")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"align_vlm.rewards: cannot load {name!r}: {error}") from None


class RewardError(RuntimeError):
    """A reward failed on a batch: the stage stops with this message (row ids, and the reward's own traceback)."""


class RowReward:
    """A `Reward` as trl calls a reward function: with the completions and the dataset's columns (`index` locates
    each completion's row), checked."""

    def __init__(self, name: str, rows: list[dict]):
        self.reward, self.rows, self.__name__ = resolve(name), rows, name   # trl logs rewards/<__name__>/mean

    def __call__(self, prompts, completions, index, **_):
        rows = [self.rows[i] for i in index]
        ids = ", ".join(row["id"] for row in rows)
        try:
            values = list(self.reward(list(completions), rows))
        except Exception:   # noqa: BLE001 - any failure of user code stops the stage with its traceback
            raise RewardError(f"reward {self.__name__} raised on rows [{ids}]:\n{traceback.format_exc()}") from None
        if len(values) != len(rows):
            raise RewardError(f"reward {self.__name__} returned {len(values)} values for {len(rows)} answers "
                              f"(rows [{ids}])")
        for row, value in zip(rows, values):
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise RewardError(f"reward {self.__name__} returned {value!r} for row {row['id']}: expected a number")
        return [float(value) for value in values]
