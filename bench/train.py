"""Our VLM trainer (transformers Trainer + stages.training.trainer: TrainingArguments from params, DataLoader workers,
dvclive curves, the step timer) against a plain PyTorch loop on the same model, the same batches and the same optimizer
(AdamW, linear schedule, gradient clipping at 1.0), both reading frame shards through DataLoader workers that encode
the samples with the real processor. Each setup runs `--repeats` times, alternating; medians are reported.

Inputs: the default pipeline's data (`dvc repro manifest` first) and train_vlm's params from params.yaml.
Step time is the time between consecutive optimizer steps, logging and evaluation excluded; data wait is the part
between one step's end and the next one's begin (train_vlm's step timer: the DataLoader's `next` and the rest of the
Trainer's work there), and "in next" the part spent fetching the batch alone (`get_batch_samples`; in the plain loop
the two are the same). Both loops run twice: with the workers running the processor (what train_vlm does),
and with every sample encoded before the clock starts, the workers only batching them: where the data wait is the
processor's work competing with the model for the same cores, it goes away in the second. Batches leave the workers
as one storage each (train_vlm's `one_storage`); our loop runs once more with a storage per tensor, as a plain
collate sends them, the baseline of that change, and once with a thread of the training process taking the batches
from the workers ahead of the model (a design not taken: the wait falls, the step gets no shorter).

    python bench/train.py                      # 120 steps per run, 3 repeats
    python bench/train.py --steps 60 --workers 0

Prints a table and writes bench/results/train.json.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, Trainer, get_linear_schedule_with_warmup

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from stages.common.console import quiet_libraries  # noqa: E402 (after the path set-up above)
from stages.common.files import read_jsonl  # noqa: E402
from stages.common.params import load, seed_everything  # noqa: E402
from stages.models import vlm  # noqa: E402
from stages.training import finetune  # noqa: E402
from stages.training.trainer import StepTimer, one_storage, training_arguments  # noqa: E402


def setup(p: dict, base: str, encoded: bool, shared: bool = True):
    """Model, processor and dataset, identical for both loops; with `encoded`, every sample encoded ahead; with
    `shared`, each batch leaves its worker as one storage (`one_storage`, as train_vlm's), else a storage a tensor."""
    seed_everything(0)
    fam = vlm.family(p["family"])
    processor = AutoProcessor.from_pretrained(base)
    model = finetune.prepare(finetune.load(fam, base, p), fam, p)
    dataset = vlm.ManifestDataset(read_jsonl("data/manifest/train.jsonl"), processor, fam, p["max_length"])
    if encoded:
        dataset = [dataset[i] for i in range(len(dataset))]
    collate = functools.partial(vlm.collate, pad_token_id=processor.tokenizer.pad_token_id)
    return model, dataset, one_storage(collate) if shared else collate


class ThreadAhead(torch.utils.data.DataLoader):
    """A DataLoader whose batches a thread of the training process takes from the workers (the round trip, the
    unpickling) while the model computes, two ahead, in order: `next` then only takes one from a queue. A baseline
    of a design not taken: does the wait go, and does the step get faster?"""

    def __iter__(self):
        ready, batches = queue.Queue(2), super().__iter__()   # made in this thread, seeds drawn as without it
        end = object()

        def fetch():
            try:
                for batch in batches:
                    ready.put(batch)
                ready.put(end)
            except Exception as error:
                ready.put(error)
        threading.Thread(target=fetch, daemon=True).start()   # a run that stops mid-epoch leaves it blocked: a bench
        while (batch := ready.get()) is not end:
            if isinstance(batch, Exception):
                raise batch
            yield batch


class TimedTrainer(Trainer):
    """The Trainer, timing what the step timer's wait holds besides the rest of the Trainer's work between steps:
    `get_batch_samples`, the DataLoader's `next` (and the count of the batch's label tokens)."""
    fetch_seconds = 0.0

    def get_batch_samples(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().get_batch_samples(*args, **kwargs)
        finally:
            self.fetch_seconds += time.perf_counter() - start


class TrainerThreadAhead(TimedTrainer):
    def get_train_dataloader(self):
        loader = super().get_train_dataloader()   # accelerate's wrapper: the batches come from its base_dataloader
        loader.base_dataloader.__class__ = ThreadAhead
        return loader


def ours(p: dict, base: str, encoded: bool, shared: bool = True, thread: bool = False) -> dict:
    model, dataset, collate = setup(p, base, encoded, shared)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as scratch:
        # step time only: no evaluation, no checkpoints, so nothing of the schedule's best-checkpoint keeping
        args = dataclasses.replace(training_arguments(p, 0, scratch, remove_unused_columns=False), eval_strategy="no",
                                   save_strategy="no", load_best_model_at_end=False)
        trainer = (TrainerThreadAhead if thread else TimedTrainer)(
            model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer])
        result = trainer.train()
    elapsed = timer.total["wait"] + timer.total["busy"]
    return {"step_s": elapsed / timer.total["steps"], "loss": result.training_loss, **timer.summary(),
            "next_fraction": trainer.fetch_seconds / elapsed}


def plain(p: dict, base: str, encoded: bool) -> dict:
    """What a hand-written script does: the same loader settings, AdamW, schedule and clipping."""
    model, dataset, collate = setup(p, base, encoded)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=p["batch_size"], shuffle=True, collate_fn=collate, num_workers=p["data_workers"],
        prefetch_factor=p["prefetch_batches"] if p["data_workers"] else None,
        persistent_workers=p["data_workers"] > 0, generator=torch.Generator().manual_seed(0))
    decay = [param for name, param in model.named_parameters() if param.ndim > 1]
    rest = [param for name, param in model.named_parameters() if param.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": p["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], lr=p["learning_rate"])
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.05 * p["max_steps"]), p["max_steps"])
    model.train()
    wait = busy = total_loss = 0.0
    batches, step = iter(loader), 0
    mark = time.perf_counter()
    while step < p["max_steps"]:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        now = time.perf_counter()
        wait, mark = wait + now - mark, now
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        total_loss += loss.item()
        step += 1
        now = time.perf_counter()
        busy, mark = busy + now - mark, now
    elapsed = wait + busy   # its wait is `next` alone
    return {"step_s": elapsed / step, "data_wait_fraction": wait / elapsed, "next_fraction": wait / elapsed,
            "samples_per_second": step * p["batch_size"] / elapsed, "loss": total_loss / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: train_vlm.data_workers)")
    args = parser.parse_args()
    quiet_libraries()

    p = {**load("train_vlm")["train_vlm"], "max_steps": args.steps, "save_steps": 0}
    if args.workers is not None:
        p["data_workers"] = args.workers
    fam = vlm.family(p["family"])
    rows = read_jsonl("data/manifest/train.jsonl")
    loops = {"ours": (ours, False), "plain": (plain, False), "ours, pre-encoded": (ours, True),
             "plain, pre-encoded": (plain, True),
             "ours, a storage a tensor": (functools.partial(ours, shared=False), False),
             "ours, a thread ahead": (functools.partial(ours, thread=True), False)}
    runs = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as scratch:
        seed_everything(0)   # as train_vlm does before it builds the base: the same weights every run
        base = str(vlm.build_tiny_base(fam, p, rows, Path(scratch) / "base"))
        for _ in range(args.repeats):
            for name, (loop, encoded) in loops.items():
                runs[name].append(loop(p, base, encoded))

    median = {name: {key: statistics.median(run[key] for run in results) for key in results[0]}
              for name, results in runs.items()}
    ratio = median["ours"]["step_s"] / median["plain"]["step_s"]
    print(f"{'loop':<26}{'step (ms)':>12}{'data wait':>12}{'in next':>12}{'samples/s':>12}{'mean loss':>12}")
    for name, m in median.items():
        print(f"{name:<26}{1000 * m['step_s']:>12.1f}{m['data_wait_fraction']:>12.4f}{m['next_fraction']:>12.4f}"
              f"{m['samples_per_second']:>12.1f}{m['loss']:>12.4f}")
    print(f"step time ratio ours / plain: {ratio:.3f} (goal <= 1.10); "
          f"our data_wait_fraction: {median['ours']['data_wait_fraction']:.4f} (goal < 0.02)")
    result = {"step_time_ratio_vs_plain": ratio, "data_wait_fraction": median["ours"]["data_wait_fraction"],
              "next_fraction": median["ours"]["next_fraction"],
              "data_wait_fraction_pre_encoded": median["ours, pre-encoded"]["data_wait_fraction"],
              "data_wait_fraction_storage_per_tensor": median["ours, a storage a tensor"]["data_wait_fraction"],
              "data_wait_fraction_thread_ahead": median["ours, a thread ahead"]["data_wait_fraction"],
              "step_ratio_thread_ahead_vs_ours": median["ours, a thread ahead"]["step_s"] / median["ours"]["step_s"],
              "goals": {"step_time_ratio_vs_plain": "<= 1.10", "data_wait_fraction": "< 0.02"},
              "median": median, "runs": runs,
              "setup": {"family": p["family"], "batch_size": p["batch_size"], "steps": args.steps,
                        "repeats": args.repeats, "data_workers": p["data_workers"],
                        "prefetch_batches": p["prefetch_batches"], "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "machine": platform.machine()}}
    out = REPO / "bench/results/train.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
