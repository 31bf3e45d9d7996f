"""What both trainers share: their TrainingArguments from params, and curves logged to dvclive by optimizer step."""
from pathlib import Path

import torch
from dvclive import Live
from dvclive.plots import Metric
from transformers import TrainerCallback, TrainingArguments

from stages.files import write_json


def training_arguments(p: dict, seed: int, output_dir: str, args_class=TrainingArguments, **extra):
    """One schedule for every trainer: AdamW, linear decay after 5 % warm-up, ~30 log points, 5 evaluations."""
    return args_class(
        output_dir=output_dir, max_steps=p["max_steps"], per_device_train_batch_size=p["batch_size"],
        per_device_eval_batch_size=p["batch_size"], learning_rate=p["learning_rate"],
        weight_decay=p["weight_decay"], warmup_steps=0.05, lr_scheduler_type="linear",
        logging_steps=max(1, p["max_steps"] // 30), eval_strategy="steps", eval_steps=max(1, p["max_steps"] // 5),
        save_strategy="no", report_to="none", seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(), **extra)


def save_trained(trainer, result, out: Path, final: Path, base: str, p: dict, **record) -> None:
    """Save the trained model to `out`/model and what made it to `out`/training.json."""
    trainer.save_model(out / "model")
    (out / "model" / "training_args.bin").unlink()  # a pickle holding a temp path: not reproducible, not needed
    write_record(out, final, base, p, result, **record)


def write_record(out: Path, final: Path, base: str, p: dict, result, **record) -> None:
    """`out`/training.json: base model, params, final step and loss, and `record`.

    `out` is the stage's scratch folder that becomes `final`: a tiny base saved inside it is recorded by its final path.
    """
    write_json(out / "training.json", {"base_model": base.replace(str(out), str(final)), "params": p, **record,
                                       "global_step": result.global_step, "train_loss": result.training_loss})


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
