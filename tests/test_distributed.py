"""Multi-process training through the real engines (torchrun, accelerate, deepspeed) on CPU processes (gloo), and the
DeepSpeed config generated from params. Each run trains a few steps of the tiny models on the small workspace."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForSeq2SeqLM

from stages import train_seq2seq, train_vlm
from stages.models import vlm
from stages.training import distributed
from tests.helpers import REPO, SMALL, inside, read_curve, write_params

STEPS = 6
TWO = {"num_processes": 2, "num_nodes": 1, "hostfile": ""}
DEEPSPEED_OFF = {"enabled": False, "zero_stage": 2, "offload_optimizer": False, "offload_params": False}
MODEL = {"train_seq2seq": "models/seq2seq", "train_vlm": "models/vlm"}


def params(stage: str, launcher: str = "none", zero_stage: int | None = None, **values) -> dict:
    """SMALL with `stage` run for STEPS steps, per-process batch 3 (the 12 train samples are 2 global batches of 6),
    on `launcher` with 2 processes."""
    deepspeed = {**DEEPSPEED_OFF, "enabled": zero_stage is not None, "zero_stage": zero_stage or 2}
    return {**SMALL, stage: {**SMALL[stage], "max_steps": STEPS, "batch_size": 3,
                             "distributed": {**TWO, "launcher": launcher}, "deepspeed": deepspeed, **values}}


def run_stage(folder, stage: str, overrides: dict) -> dict:
    """`python -m stages.<stage>` in `folder`, as dvc.yaml runs it; its training.json."""
    write_params(folder, overrides)
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((folder / MODEL[stage] / "training.json").read_text())


def curve(folder, stage: str) -> list[tuple[int, float]]:
    return read_curve(folder / f"dvclive/{stage}/plots/metrics/train/loss.tsv")


def weights(folder, stage: str) -> dict:
    """The saved model's weights as transformers loads them, which must find every one of them."""
    model_class = AutoModelForSeq2SeqLM if stage == "train_seq2seq" else vlm.family("llava").MODEL_CLASS
    model, info = model_class.from_pretrained(folder / MODEL[stage] / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.state_dict()


@pytest.fixture(scope="module")
def one_process(small_data, tmp_path_factory):
    """Each trainer in this process with batch 6: the global batch that 2 processes x 3 see at every step."""
    runs = {}
    for stage, module in (("train_seq2seq", train_seq2seq), ("train_vlm", train_vlm)):
        folder = tmp_path_factory.mktemp(stage) / "ws"
        shutil.copytree(small_data, folder)
        write_params(folder, params(stage, batch_size=6))
        with inside(folder):
            module.main()
        runs[stage] = folder
    return runs


def assert_trained_like_one_process(folder, stage: str, reference, exact_loss: bool) -> None:
    """Two processes on halves of the batch train the model that one process trains on the whole batch.

    The VLM's loss is a mean over all tokens of the global batch, so the runs agree to float rounding. The seq2seq
    models average the loss per process, so only the first step (same weights, same samples) agrees that closely.
    """
    ours, theirs = curve(folder, stage), curve(reference, stage)
    assert [step for step, _ in ours] == list(range(1, STEPS + 1))      # rank 0 alone logged, once per step
    assert ours[0][1] == pytest.approx(theirs[0][1], rel=1e-5)          # a loss scaled by the process count fails
    if exact_loss:
        assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], rel=1e-4)
    trained, expected = weights(folder, stage), weights(reference, stage)
    assert trained.keys() == expected.keys()
    drift = max((trained[name] - expected[name]).abs().max().item() for name in expected)
    assert drift < (1e-3 if exact_loss else 2e-2)
    assert not list(folder.glob("models/*.partial")) and not (folder / "checkpoints").exists()


def test_seq2seq_trains_on_two_processes_under_torchrun(workspace, one_process):
    training = run_stage(workspace, "train_seq2seq", params("train_seq2seq", "torchrun"))
    assert training["engine"]["processes"] == 2 and training["global_step"] == STEPS
    assert_trained_like_one_process(workspace, "train_seq2seq", one_process["train_seq2seq"], exact_loss=False)


def test_vlm_trains_on_two_processes_under_accelerate(workspace, one_process):
    training = run_stage(workspace, "train_vlm", params("train_vlm", "accelerate"))
    assert training["engine"]["processes"] == 2 and training["global_step"] == STEPS
    assert_trained_like_one_process(workspace, "train_vlm", one_process["train_vlm"], exact_loss=True)


# Each trainer under one ZeRO stage (the stages share stages/training/distributed.py): the stage's own command, as
# dvc runs it, starts the deepspeed launcher on two processes
@pytest.mark.parametrize(("stage", "zero_stage"), [("train_seq2seq", 2), ("train_vlm", 3)])
def test_deepspeed_zero_trains_on_two_processes_under_its_launcher(workspace, one_process, stage, zero_stage):
    training = run_stage(workspace, stage, params(stage, "deepspeed", zero_stage))
    engine = training["engine"]
    assert engine["processes"] == 2 and engine["deepspeed_zero_stage"] == zero_stage
    assert engine["optimizer"].startswith("DeepSpeedZeroOptimizer")
    assert_trained_like_one_process(workspace, stage, one_process[stage], exact_loss=stage == "train_vlm")
    written = json.loads((workspace / MODEL[stage] / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == zero_stage and written["optimizer"]["params"]["lr"] == "auto"


def test_the_learning_rate_in_params_is_what_the_deepspeed_optimizer_gets(workspace):
    """One process, no launcher: DeepSpeed's optimizer takes its "auto" lr from params, and follows a change."""
    for rate in (0.001, 0.004):
        training = run_stage(workspace, "train_seq2seq", params("train_seq2seq", zero_stage=2, learning_rate=rate))
        assert training["engine"]["optimizer_peak_lr"] == rate and training["engine"]["processes"] == 1
        logged = (workspace / "dvclive/train_seq2seq/plots/metrics/train/learning_rate.tsv").read_text()
        assert max(float(line.split("\t")[1]) for line in logged.splitlines()[1:]) == pytest.approx(rate)


def test_the_deepspeed_config_leaves_every_trainer_value_to_params():
    config = distributed.deepspeed_config({"enabled": True, "zero_stage": 3, "offload_optimizer": True,
                                           "offload_params": True})
    assert set(config["optimizer"]["params"].values()) >= {"auto"} and config["optimizer"]["params"]["lr"] == "auto"
    assert all(config[key] == "auto" for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                 "gradient_accumulation_steps", "gradient_clipping"))
    assert config["bf16"] == {"enabled": "auto"} and "scheduler" not in config     # the Trainer's own schedule
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert not config["optimizer"]["params"]["torch_adam"]          # offload runs DeepSpeed's CPU Adam
    assert distributed.deepspeed_config(DEEPSPEED_OFF) is None
    with pytest.raises(SystemExit, match="offload_params needs zero_stage 3"):
        distributed.deepspeed_config({**DEEPSPEED_OFF, "enabled": True, "offload_params": True})


def test_multi_node_torchrun_and_accelerate_need_the_rendezvous_from_the_environment(monkeypatch):
    for name in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    nodes = {"launcher": "torchrun", "num_processes": 8, "num_nodes": 2, "hostfile": ""}
    with pytest.raises(SystemExit, match="set NODE_RANK, MASTER_ADDR, MASTER_PORT on every node"):
        distributed.engine_command("stages.train_vlm", nodes)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    command = distributed.engine_command("stages.train_vlm", {**nodes, "launcher": "accelerate"})
    assert command[command.index("--num_processes") + 1] == "16" and command[-2:] == ["-m", "stages.train_vlm"]
    assert command[command.index("--machine_rank") + 1] == "1"
    # the deepspeed launcher reaches the other nodes itself, through the hostfile
    command = distributed.engine_command("stages.train_vlm", {**nodes, "launcher": "deepspeed", "hostfile": "hosts"})
    assert command[command.index("--hostfile") + 1] == "hosts" and "--num_gpus" in command
