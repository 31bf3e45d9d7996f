"""Users' GRPO rewards: each module here may define functions `(answers: list[str], rows: list[dict]) -> list[float]`,
named in params.yaml as `align_vlm.grpo.rewards: [rewards.<module>:<function>]` (stages/training/rewards.py). The
align_vlm stage depends on this folder, so editing a reward reruns it."""
