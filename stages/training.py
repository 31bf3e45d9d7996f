"""What both trainers share: curves logged to dvclive against the optimizer step."""
from dvclive import Live
from dvclive.plots import Metric
from transformers import TrainerCallback


class LiveCallback(TrainerCallback):
    """Log every Trainer log line to dvclive at x = global step.

    transformers' own DVCLiveCallback counts log calls as steps, so training and eval curves (logged at different
    intervals) would not line up, nor would runs with other logging intervals.
    """

    def __init__(self, directory: str):
        # dvcyaml=None: dvclive must not rewrite our dvc.yaml; metrics and plots are declared there by hand.
        # save_dvc_exp=False: the stage runs inside `dvc repro` / `dvc exp run`, which own the experiment.
        self.live = Live(directory, dvcyaml=None, save_dvc_exp=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.live.step = state.global_step
        for key, value in (logs or {}).items():
            if Metric.could_log(value):
                name = key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}"
                self.live.log_metric(name, value)
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.live.end()
