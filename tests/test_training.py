import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages import train_seq2seq
from stages.training import CHECKPOINTS, checkpoint_folder
from tests.conftest import REPO, SMALL, write_params

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
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], "max_steps": 40, "save_steps": 5}})
    process = subprocess.Popen([sys.executable, "-m", "stages.train_seq2seq"], cwd=workspace,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    saved = wait_for_checkpoint(process, CHECKPOINTS / "train_seq2seq")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (workspace / "models/seq2seq").exists()        # nothing half-written in the output

    train_seq2seq.main()
    training = json.loads((workspace / "models/seq2seq/training.json").read_text())
    resumed = int(training["resumed_from"].removeprefix("checkpoint-"))
    assert resumed >= saved and training["global_step"] == 40
    assert not CHECKPOINTS.exists() and not list((workspace / "models").rglob("checkpoint-*"))


def wait_for_checkpoint(process, folder: Path, timeout: float = 120) -> int:
    """The step of the first complete checkpoint (trainer_state.json is written last)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = list(folder.glob("*/checkpoint-*/trainer_state.json"))
        if states:
            return int(states[0].parent.name.removeprefix("checkpoint-"))
        assert process.poll() is None, "training ended before it saved a checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {folder} after {timeout} s")
