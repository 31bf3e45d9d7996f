"""What both trainers share: their TrainingArguments from params, checkpoints a rerun resumes from, batches that
leave a DataLoader worker as one storage, and curves logged to dvclive by optimizer step, with how long each step
waited for its data."""
import copy
import functools
import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path

import torch
from dvclive import Live
from dvclive.plots import Metric
from tqdm import tqdm
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from stages.common.files import write_json
from stages.training import schedule
from stages.training.distributed import barrier, deepspeed_config, is_main_process

CHECKPOINTS = Path("checkpoints")
CODE = Path(__file__).parents[1]   # the stages package: a code change makes old checkpoints unusable


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
    for other in (CHECKPOINTS / stage).glob("*") if is_main_process() else []:
        if other != folder:
            shutil.rmtree(other)
    return folder


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in `folder`: the Trainer writes trainer_state.json last, so a checkpoint that
    a kill interrupted has none and is skipped."""
    complete = [path.parent for path in folder.glob("checkpoint-*/trainer_state.json")]
    return str(max(complete, key=lambda path: int(path.name.removeprefix("checkpoint-")))) if complete else None


def remove_checkpoints(stage: str) -> None:
    """A finished run leaves no checkpoints behind. Every process calls it, and the main one removes them once all
    are here: under ZeRO another process may still be reading its shard of the best checkpoint."""
    barrier()
    if not is_main_process():
        return
    shutil.rmtree(CHECKPOINTS / stage, ignore_errors=True)
    if CHECKPOINTS.is_dir() and not any(CHECKPOINTS.iterdir()):
        CHECKPOINTS.rmdir()


def use_bf16(p: dict) -> bool:
    """`bf16: auto` means bf16 mixed precision where the hardware has it (a CUDA GPU that supports it)."""
    if p["bf16"] == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return p["bf16"]


def training_arguments(p: dict, seed: int, output_dir: str, args_class=TrainingArguments, **extra):
    """Every trainer's arguments: AdamW with a linear decay after the warm-up, and the length, evaluations,
    checkpoints (in `output_dir`), kept weights and early stopping of stages/training/schedule.py; DeepSpeed when
    `deepspeed.enabled`.

    Creating them joins the process group when an engine launched this process: do it before loading the model, which
    ZeRO-3 then partitions as it loads.
    """
    workers, deepspeed = p["data_workers"], deepspeed_config(p["deepspeed"])
    return args_class(
        output_dir=output_dir, **schedule.arguments(p), per_device_train_batch_size=p["batch_size"],
        per_device_eval_batch_size=p["batch_size"], gradient_accumulation_steps=p["gradient_accumulation_steps"],
        learning_rate=p["learning_rate"], weight_decay=p["weight_decay"], lr_scheduler_type="linear",
        bf16=use_bf16(p), report_to="none", seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=workers, dataloader_prefetch_factor=p["prefetch_batches"] if workers else None,
        dataloader_persistent_workers=workers > 0, dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=copy.deepcopy(deepspeed),   # a copy: transformers fills in the "auto"s
        # without CUDA, processes that an engine started form a (gloo) group only when told they are CPU processes
        use_cpu=not torch.cuda.is_available(), **extra)


ALIGN = 64   # bytes: each tensor of a one_storage batch starts aligned for any dtype


def one_storage(collate):
    """`collate`, its batch tensors made views of one byte buffer, so that a DataLoader worker hands the training
    process one storage per batch.

    torch sends each storage on its own: the worker shares it, and the training process fetches its file descriptor
    through the worker's resource sharer (a socket connection and a handshake, while both compete for the cores) and
    maps it. Tensors that share a storage send it once. LLaVA's batch of four tensors made four round trips; now it
    makes one, for the cost of copying the batch once in the worker (bench/train.py)."""
    @functools.wraps(collate)
    def collate_into_one(examples):
        batch = collate(examples)
        tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
        sizes = [-(-value.nbytes // ALIGN) * ALIGN for value in tensors.values()]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        for (key, value), start in zip(tensors.items(), itertools.accumulate([0] + sizes)):
            batch[key] = buffer[start:start + value.nbytes].view(value.dtype).view(value.shape).copy_(value)
        return batch
    return collate_into_one


def save_model(trainer, folder: Path) -> None:
    """The Trainer's save (every process takes part: ZeRO-3 gathers the weights; rank 0 writes them)."""
    trainer.save_model(folder)
    if is_main_process():
        # a pickle of the arguments, with the checkpoint path and this process's device: not reproducible, not needed
        (folder / "training_args.bin").unlink()


def write_record(trainer, out: Path, final: Path, base: str, p: dict, result, **record) -> None:
    """On rank 0: `out`/training.json (base model, params, how it ran, final step and loss, the kept step and its
    score, and `record`), and the DeepSpeed config as generated, `out`/deepspeed.json.

    `out` is the stage's scratch folder that becomes `final`: a tiny base saved inside it is recorded by its final path.
    """
    if not is_main_process():
        return
    config = deepspeed_config(p["deepspeed"])
    if config:
        write_json(out / "deepspeed.json", config)
    optimizer = trainer.optimizer
    engine = {"processes": trainer.args.world_size, "deepspeed_zero_stage": config and p["deepspeed"]["zero_stage"],
              "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
              "optimizer_peak_lr": optimizer.param_groups[0]["initial_lr"]}   # what the optimizer got, auto or not
    write_json(out / "training.json", {"base_model": base.replace(str(out), str(final)), "params": p, **record,
                                       "engine": engine, "global_step": result.global_step,
                                       "train_loss": result.training_loss,
                                       "selection": schedule.selection(trainer.state, trainer.args)})


def trained_path(models: Path) -> Path:
    """What evaluate and push load from a trainer's output: the full (or LoRA-merged) model, else the adapter."""
    return models / "model" if (models / "model").exists() else models / "adapter"


def final_output(models: Path, name: str) -> Path:
    """The trainer output that evaluate scores and push exports as model `name`: for the VLM, align_vlm's
    (models/vlm_aligned) when it trained, else train_vlm's (models/vlm)."""
    aligned = models / "vlm_aligned" / "training.json"
    if name == "vlm" and aligned.exists() and json.loads(aligned.read_text())["method"] != "none":
        return aligned.parent
    return models / name


class StepTimer(TrainerCallback):
    """How long optimizer steps take, and how much of it they wait for their batches (the DataLoader's `next`).

    The Trainer fetches a step's batches between on_step_end of the step before (then logging, evaluation and
    saving, which are neither) and on_step_begin. Each training log line gets `data_wait_fraction` (wait / step time)
    and `samples_per_second` over the steps since the last one; `summary()` gives both for the whole run.
    """

    def __init__(self):
        self.mark = 0.0
        self.interval = {"wait": 0.0, "busy": 0.0, "steps": 0}
        self.total = dict(self.interval)

    def _lap(self, key: str, steps: int = 0) -> None:
        now = time.perf_counter()
        for counts in (self.interval, self.total):
            counts[key] += now - self.mark
            counts["steps"] += steps
        self.mark = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_step_begin(self, args, state, control, **kwargs):
        self._lap("wait")

    def on_step_end(self, args, state, control, **kwargs):
        self._lap("busy", steps=1)

    def on_evaluate(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    on_save = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.interval["steps"]:
            logs.update(self.rates(self.interval))
            self.interval = {"wait": 0.0, "busy": 0.0, "steps": 0}
        self.mark = time.perf_counter()

    def rates(self, counts: dict) -> dict:
        elapsed = counts["wait"] + counts["busy"]
        return {"data_wait_fraction": counts["wait"] / elapsed,
                "samples_per_second": counts["steps"] * self.samples_per_step / elapsed}

    def summary(self) -> dict:
        return self.rates(self.total) if self.total["steps"] else {}


class ProgressBar(TrainerCallback):
    """The stage's bar of optimizer steps with the latest training loss, on the main process. It stands in for the
    Trainer's PrinterCallback (`disable_tqdm` leaves that one), which prints every log line as a dict: dvclive keeps
    those. `replace_printer` swaps them."""

    def __init__(self, stage: str):
        self.stage, self.bar = stage, None

    @classmethod
    def replace_printer(cls, trainer, stage: str) -> None:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(cls(stage))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                            mininterval=2)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class LiveCallback(TrainerCallback):
    """Log every Trainer log line to dvclive at x = global step, from the main process only; at the end, the model
    selection as two custom plots, plots/custom/{evaluations,kept}.json: the selection metric at each evaluation
    and at the step whose weights were kept, so that a plot marks that step.

    transformers' own DVCLiveCallback counts log calls as steps, so training and eval curves (logged at different
    intervals) would not line up, nor would runs with other logging intervals.
    """

    def __init__(self, directory: str):
        self.directory, self.live = directory, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # dvcyaml=None: dvclive must not rewrite our dvc.yaml; metrics and plots are declared there by hand.
            # save_dvc_exp=False: the stage runs inside `dvc repro` / `dvc exp run`, which own the experiment.
            self.live = Live(self.directory, dvcyaml=None, save_dvc_exp=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None:
            return
        self.live.step = state.global_step
        for key, value in (logs or {}).items():
            if Metric.could_log(value):
                name = key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}"
                self.live.log_metric(name, value)
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is None:
            return
        chosen = schedule.selection(state, args)
        kept = {key: chosen[key] for key in ("step", "score", "metric", "keep")}
        for name, points in (("evaluations", chosen["evaluations"]), ("kept", [kept])):
            self.live.log_plot(name, points, x="step", y="score", template="scatter", y_label=chosen["metric"])
        self.live.end()
