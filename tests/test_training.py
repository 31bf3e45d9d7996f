import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from stages import train_seq2seq
from stages.common.params import load
from stages.training.distributed import free_port
from stages.training.trainer import (
    CHECKPOINTS,
    StepTimer,
    checkpoint_folder,
    one_storage,
    training_arguments,
    use_bf16,
)
from tests.helpers import REPO, SMALL, kill_after_checkpoint, write_params

P = {"learning_rate": 0.001, "max_steps": 10}


def test_the_checkpoint_folder_is_one_per_exact_run_and_a_changed_run_drops_the_old_one(workspace):
    inputs = [Path("data/manifest/train.jsonl")]
    first = checkpoint_folder("train_x", P, 0, inputs)
    assert checkpoint_folder("train_x", P, 0, inputs) == first
    first.mkdir(parents=True)
    changed = {"params": checkpoint_folder("train_x", {**P, "learning_rate": 0.002}, 0, inputs),
               "seed": checkpoint_folder("train_x", P, 1, inputs)}
    Path("data/manifest/train.jsonl").write_text(Path("data/manifest/train.jsonl").read_text() + "\n")
    changed["input"] = checkpoint_folder("train_x", P, 0, inputs)
    assert first not in changed.values() and len(set(changed.values())) == 3
    assert not first.exists()          # a changed run never resumes the old checkpoints


def test_a_killed_training_run_resumes_from_its_last_checkpoint_and_cleans_up(workspace):
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], "max_steps": 40, "eval_every": 5}})
    saved = kill_after_checkpoint("train_seq2seq", workspace)
    assert not (workspace / "models/seq2seq").exists()        # nothing half-written in the output

    train_seq2seq.main()
    training = json.loads((workspace / "models/seq2seq/training.json").read_text())
    resumed = int(training["resumed_from"].removeprefix("checkpoint-"))
    assert resumed >= saved and training["global_step"] == 40
    assert not CHECKPOINTS.exists() and not list((workspace / "models").rglob("checkpoint-*"))


# One process of a two-process run at its end: rank 1 is still reading its ZeRO shard of the best checkpoint (the
# Trainer's load of the best model) when rank 0 is done and removes the checkpoints.
RANK = """
import time
import torch.distributed as dist
from stages.training.trainer import CHECKPOINTS, remove_checkpoints
dist.init_process_group("gloo")
folder = CHECKPOINTS / "train_seq2seq" / "checkpoint-6"
if dist.get_rank() == 1:
    time.sleep(2)
    assert folder.is_dir(), "rank 0 removed the checkpoints while rank 1 still read them"
remove_checkpoints("train_seq2seq")
dist.destroy_process_group()
"""


def test_checkpoints_are_removed_once_every_process_is_done(tmp_path):
    (tmp_path / CHECKPOINTS / "train_seq2seq" / "checkpoint-6").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK], cwd=tmp_path, env={**env, "RANK": str(rank)},
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    assert not (tmp_path / CHECKPOINTS).exists()


def test_bf16_auto_is_off_without_a_gpu_and_explicit_values_win():
    assert use_bf16({"bf16": "auto"}) == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert use_bf16({"bf16": True}) is True and use_bf16({"bf16": False}) is False


class SlowSamples(torch.utils.data.Dataset):
    """Each sample takes 30 ms to read, like a frame shard on a slow disk."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        time.sleep(0.03)
        return {"x": torch.full((4,), float(index)), "labels": torch.tensor(1.0)}


class SlowModel(torch.nn.Module):
    """Each step computes for 30 ms."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        time.sleep(0.03)
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


@pytest.mark.parametrize("workers", [0, 2])
def test_the_step_timer_measures_the_wait_for_data_that_loader_workers_hide(tmp_path, workers):
    """Reading in the training process leaves the step waiting half of the time; two workers that prefetch overlap
    the reading with the model's step. Evaluations (every 4 steps, also slow to read) count as neither."""
    p = {**load("train_seq2seq", REPO / "params.yaml")["train_seq2seq"], "max_steps": 24, "eval_every": 4,
         "batch_size": 1, "learning_rate": 0.01, "weight_decay": 0.0, "keep": "last", "save_steps": 0,
         "gradient_accumulation_steps": 1, "bf16": False, "data_workers": workers, "prefetch_batches": 2,
         "deepspeed": {"enabled": False, "zero_stage": 2, "offload_optimizer": False, "offload_params": False}}
    timer = StepTimer()
    args = training_arguments(p, 0, str(tmp_path))
    Trainer(model=SlowModel(), args=args, train_dataset=SlowSamples(64), eval_dataset=SlowSamples(4),
            callbacks=[timer]).train()
    summary = timer.summary()
    if workers:
        assert summary["data_wait_fraction"] < 0.25
    else:
        assert 0.35 < summary["data_wait_fraction"] < 0.65
    assert summary["samples_per_second"] == pytest.approx(1 / 0.06 if not workers else 1 / 0.03, rel=0.4)


def mixed_batch(indices: list[int]) -> dict:
    """A collate's output of every kind one_storage must carry: dtypes of 1 to 8 bytes, a non-contiguous tensor, an
    empty one, a scalar, and a value that is no tensor."""
    rows = torch.tensor(indices)
    return {"input_ids": rows[:, None] * torch.arange(5), "attention_mask": torch.ones(len(rows), 5, dtype=torch.bool),
            "pixel_values": (rows[:, None, None] + torch.rand(len(rows), 3, 7, generator=torch.Generator().manual_seed(
                int(rows.sum())))).transpose(1, 2), "half": rows.to(torch.bfloat16) / 3, "empty": torch.zeros(0, 2),
            "count": rows.sum(), "use_cache": False}


@pytest.mark.parametrize("workers", [0, 2])
def test_one_storage_batches_arrive_equal_and_in_one_storage(workers):
    """Through a real DataLoader: the same keys, values, dtypes and shapes as the collate gave, and with workers
    every tensor a view of one storage, so that torch sent one (a plain collate's batch arrives in one per tensor)."""
    loaders = {shared: torch.utils.data.DataLoader(range(8), batch_size=4, num_workers=workers, collate_fn=(
        one_storage(mixed_batch) if shared else mixed_batch)) for shared in (True, False)}
    for batch, plain in zip(*(list(loaders[shared]) for shared in (True, False)), strict=True):
        assert list(batch) == list(plain)
        for key, value in plain.items():
            if torch.is_tensor(value):
                assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
            else:
                assert batch[key] == value
        storages = {value.untyped_storage().data_ptr() for value in batch.values() if torch.is_tensor(value)}
        plain_storages = {value.untyped_storage().data_ptr() for value in plain.values() if torch.is_tensor(value)}
        assert len(storages) == 1 and len(plain_storages) == 6
