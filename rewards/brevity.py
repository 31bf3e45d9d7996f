"""An example reward: answers as long as their reference score 1, and the score falls with the difference in words.
Use it as `align_vlm.grpo.rewards: [attribute, rewards.brevity:score]`."""


def score(answers: list[str], rows: list[dict]) -> list[float]:
    rewards = []
    for answer, row in zip(answers, rows):
        said, wanted = len(answer.split()), len(row["target"].split())
        rewards.append(1.0 - abs(said - wanted) / max(said, wanted, 1))
    return rewards
