"""What both trainers share: their TrainingArguments from params, checkpoints a rerun resumes from, and curves
logged to dvclive by optimizer step."""
import hashlib
import json
import shutil
from pathlib import Path

import torch
from dvclive import Live
from dvclive.plots import Metric
from transformers import TrainerCallback, TrainingArguments

from stages.files import write_json

CHECKPOINTS = Path("checkpoints")
CODE = Path(__file__).parent   # the stages package: a code change makes old checkpoints unusable


def checkpoint_folder(stage: str, p: dict, seed: int, inputs: list[Path]) -> Path:
    """checkpoints/<stage>/<fingerprint>/: where a run saves a checkpoint every `save_steps`, and where a rerun of
    exactly the same run (same params, seed, input files and code) resumes after a crash or a kill.

    It lies outside the stage's outputs, which DVC deletes before it reruns a stage; it is git-ignored and not tracked
    by DVC. Checkpoints of any other fingerprint are deleted: a changed run never resumes them.
    """
    digest = hashlib.sha256(json.dumps({"params": p, "seed": seed}, sort_keys=True).encode())
    files = [(f.relative_to(CODE), f) for f in sorted(CODE.rglob("*")) if f.suffix in (".py", ".json")]
    files += [(f, f) for path in inputs for f in (sorted(path.rglob("*")) if path.is_dir() else [path]) if f.is_file()]
    for name, path in files:
        digest.update(f"{name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    folder = CHECKPOINTS / stage / digest.hexdigest()[:16]
    for other in (CHECKPOINTS / stage).glob("*"):
        if other != folder:
            shutil.rmtree(other)
    return folder


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in `folder`: the Trainer writes trainer_state.json last, so a checkpoint that
    a kill interrupted has none and is skipped."""
    complete = [path.parent for path in folder.glob("checkpoint-*/trainer_state.json")]
    return str(max(complete, key=lambda path: int(path.name.removeprefix("checkpoint-")))) if complete else None


def remove_checkpoints(stage: str) -> None:
    """A finished run leaves no checkpoints behind."""
    shutil.rmtree(CHECKPOINTS / stage, ignore_errors=True)
    if CHECKPOINTS.is_dir() and not any(CHECKPOINTS.iterdir()):
        CHECKPOINTS.rmdir()


def training_arguments(p: dict, seed: int, output_dir: str, args_class=TrainingArguments, **extra):
    """One schedule for every trainer: AdamW, linear decay after 5 % warm-up, ~30 log points, 5 evaluations, the
    latest checkpoint every `save_steps` (0: none) in `output_dir`."""
    return args_class(
        output_dir=output_dir, max_steps=p["max_steps"], per_device_train_batch_size=p["batch_size"],
        per_device_eval_batch_size=p["batch_size"], learning_rate=p["learning_rate"],
        weight_decay=p["weight_decay"], warmup_steps=0.05, lr_scheduler_type="linear",
        logging_steps=max(1, p["max_steps"] // 30), eval_strategy="steps", eval_steps=max(1, p["max_steps"] // 5),
        save_strategy="steps" if p["save_steps"] else "no", save_steps=max(1, p["save_steps"]), save_total_limit=1,
        report_to="none", seed=seed, data_seed=seed, disable_tqdm=True,
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
