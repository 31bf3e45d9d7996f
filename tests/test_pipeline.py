"""End to end through the real `dvc` CLI, in a temporary git repository holding a copy of this working tree.

The tests share one repository and run in order: the full default run (which must reproduce the committed dvc.lock
and eval/metrics.json), then what DVC must (not) rerun after it, the remote round trip, another family, queued
experiments (DPO and GRPO), the Hub push, LoRA on cached vision features and a killed run. Each family, launcher and
bad input is tested stage by stage in the other test files: what is here needs DVC itself, and each experiment costs
CI a minute or more.
Each experiment starts from the committed params.yaml plus its own settings (helpers.exp_run), never from what an
earlier test left in the shared workspace. A stage whose params and inputs come back to an earlier run's is restored
from DVC's run cache instead of run, unless it has an output with `cache: false` (manifest, evaluate): DVC keeps no
run cache for those.
"""
import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from tests.fake_hub import FakeHub
from tests.helpers import (
    ENV,
    committed,
    copy_repository,
    dvc,
    exp_run,
    git,
    ran,
    read_curve,
    reset_params,
    run_card_snippet,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.e2e
ALL = {"collect", "extract", "manifest", "train_seq2seq", "embed", "train_vlm", "align_vlm", "evaluate", "train_t2v",
       "evaluate_t2v", "push"}
DATA_STAGES = ("collect", "extract", "manifest")
PINNED_METRICS = ("eval/metrics.json", "eval/t2v/metrics.json")   # eval/metrics.tolerance.json covers both
# The default text-to-video model (AnimateDiff, 400 steps) learns colour, not yet motion (README: Text-to-video)
T2V_COLOR_GAIN = 0.3    # measured 0.51-0.72 over the pin's five runs (README); chance noise on 72 clips is about 0.045


def data_hashes(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {stage: lock[stage]["outs"] for stage in DATA_STAGES}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    repo = copy_repository(tmp_path_factory.mktemp("pipeline"))
    output = dvc(repo, "repro")
    return {"repo": repo, "first_run": output, "first_data_hashes": data_hashes(repo)}


def test_default_run_trains_models_that_learned(pipeline):
    repo = pipeline["repo"]
    assert ran(pipeline["first_run"]) == ALL
    metrics = json.loads((repo / "eval/metrics.json").read_text())
    assert metrics["vlm"]["attribute_accuracy"] >= 0.95
    assert metrics["vlm_untrained"]["attribute_accuracy"] < 0.6
    assert metrics["seq2seq"]["bleu"] > metrics["seq2seq_untrained"]["bleu"] + 50
    t2v = json.loads((repo / "eval/t2v/metrics.json").read_text())
    assert t2v["real"] == {"color_accuracy": 1.0, "direction_accuracy": 1.0}
    assert t2v["t2v"]["color_accuracy"] >= t2v["t2v_untrained"]["color_accuracy"] + T2V_COLOR_GAIN
    assert t2v["t2v"]["frechet_distance"] < t2v["t2v_untrained"]["frechet_distance"] / 2
    for name in ("seq2seq", "vlm", "t2v"):
        card = (repo / "export" / name / "README.md").read_text()
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][f"train_{name}"]["deps"]
        assert all(d["md5"] in card for d in lock if d["path"].startswith("data/"))


def test_default_run_reproduces_the_committed_lock_and_metrics(pipeline):
    """The pinned experiment. A change that moves these on purpose commits the new dvc.lock and eval/metrics.json
    together (README: "Pinned results"). The data stages' outputs equal those of the clean run that made the
    committed lock, on another day and often another machine: they are deterministic across clean runs. Compared
    with HEAD's, not the working tree's: a local `make repro` may have overwritten those files."""
    lock = yaml.safe_load(committed("dvc.lock"))["stages"]
    for stage, outs in pipeline["first_data_hashes"].items():
        assert outs == lock[stage]["outs"], f"{stage}: outputs differ from the committed dvc.lock"
    metrics, pinned = {}, {}
    for path in PINNED_METRICS:
        metrics |= json.loads((pipeline["repo"] / path).read_text())
        pinned |= json.loads(committed(path))
    tolerance = json.loads(committed("eval/metrics.tolerance.json"))
    assert set(tolerance) == {f"{model}.{name}" for model, scores in pinned.items() for name in scores}
    for key, allowed in tolerance.items():
        model, name = key.split(".")
        assert abs(metrics[model][name] - pinned[model][name]) <= allowed, (
            f"{key}: {metrics[model][name]} drifted from the committed {pinned[model][name]} by more than {allowed}")


def test_plots_and_metrics_show(pipeline):
    repo = pipeline["repo"]
    assert "attribute_accuracy" in dvc(repo, "metrics", "show")
    dvc(repo, "plots", "show", "-o", "plots_html")
    page = (repo / "plots_html" / "index.html").read_text()
    for title in ("Training loss", "Validation loss", "Test metrics, trained vs untrained",
                  "CIDEr-D, trained vs untrained", "Text-to-video training loss", "eval/t2v/strips"):
        assert title in page


def test_second_repro_runs_nothing(pipeline):
    output = dvc(pipeline["repo"], "repro")
    assert ran(output) == set()
    assert "Data and pipelines are up to date" in output


def test_a_second_clone_gets_every_output_from_the_remote_without_running_a_stage(pipeline, tmp_path):
    first, second, remote = pipeline["repo"], tmp_path / "second", tmp_path / "remote"
    dvc(first, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(first, "push", "--run-cache")
    git(first, "add", "dvc.lock", *PINNED_METRICS, "data/manifest/stats.json")   # this machine's values
    git(first, "commit", "-qm", "results of the default run")
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    dvc(second, "remote", "modify", "--local", "local", "url", str(remote))
    output = dvc(second, "repro", "--pull")
    assert ran(output) == set(), output
    assert "Data and pipelines are up to date" in dvc(second, "status")
    for path in ("models/vlm/model/model.safetensors", "export/vlm/README.md", "eval/predictions.jsonl"):
        assert (second / path).read_bytes() == (first / path).read_bytes()


def test_a_hub_push_uses_the_token_and_writes_it_nowhere(pipeline):
    repo = pipeline["repo"]            # still at the default run's outputs: the push params alone differ
    server, token = FakeHub(), f"hf_FAKE_{secrets.token_hex(12)}"
    env = {**ENV, "HF_TOKEN": token, "HF_ENDPOINT": server.url, "HF_USER_ID": "alice"}
    try:
        output = exp_run(repo, "push.target=hf", "push.dataset=true", env=env)
        assert ran(output) == {"push"}
        receipt = json.loads((repo / "export/push.json").read_text())
        assert receipt["models"]["vlm"]["repo"] == "alice/video-lm-vlm" and receipt["dataset"]["uploaded"]
        assert "model.safetensors" in server.files("alice/video-lm-vlm")
        uploads = [r for r in server.requests if "/commit/" in r["path"] or r["path"] == "/api/repos/create"]
        assert {r["authorization"] for r in uploads} == {f"Bearer {token}"}             # it was used ...

        commits = len(server.calls("POST", "/commit/"))
        output += dvc(repo, "repro", "-s", "-f", "push", env=env)                   # a forced rerun uploads nothing
        assert len(server.calls("POST", "/commit/")) == commits
        assert not json.loads((repo / "export/push.json").read_text())["models"]["vlm"]["uploaded"]
    finally:
        server.close()
    # ... and is in no file of the repository (data/, models/, eval/, export/, dvclive/, dvc.lock, .dvc/ and its
    # cache and logs, .git/) nor in what the stages printed
    assert token not in output
    leaks = [str(path) for path in repo.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert leaks == []


def test_a_train_vlm_param_reruns_only_train_vlm_evaluate_and_push_and_the_card_answers_as_evaluate_did(
        pipeline, tmp_path):
    """Another family (test_push.py takes each one through the same stages in-process) through `dvc exp run`: it
    learns, it is scored beside the default, and its export's card snippet, pasted verbatim, answers a test video
    file as evaluate did."""
    repo = pipeline["repo"]
    output = exp_run(repo, "train_vlm.family=qwen2_5_vl", "train_vlm.max_steps=60")
    # embed reads the family (with the cache off it records so in a second); align_vlm reruns on the new SFT model,
    # but with method none its output is the same: evaluate runs for train_vlm
    assert ran(output) == {"embed", "train_vlm", "align_vlm", "evaluate", "push"}
    assert json.loads((repo / "models/vlm/training.json").read_text())["family"] == "qwen2_5_vl"
    losses = [loss for _, loss in read_curve(repo / "dvclive/train_vlm/plots/metrics/train/loss.tsv")]
    assert losses[-1] < losses[0] / 2, losses
    assert json.loads((repo / "export/vlm/config.json").read_text())["model_type"] == "qwen2_5_vl"
    diff = dvc(repo, "metrics", "diff")       # this experiment against the committed default
    for metric in ("vlm.bleu", "vlm.rouge_l", "vlm.cider_d", "vlm.meteor", "vlm.attribute_accuracy"):
        assert metric in diff, diff
    printed, evaluated = run_card_snippet(repo, repo / "export/vlm", tmp_path)
    assert printed == evaluated


def test_an_extract_param_reruns_extract_and_leaves_out_of_date_what_reads_frames_not_collect_or_seq2seq(pipeline):
    repo = pipeline["repo"]
    output = exp_run(repo, "extract.frame_size=24", options=("manifest",))
    assert ran(output) == {"extract", "manifest"}
    # The manifest is rebuilt but comes out identical (it names each video's shard, not where the shard lies in the
    # packs): the stages that read frames are out of date, train_seq2seq (the manifest alone) is not. (Stages also
    # show the params of the previous experiment, whose outputs are still in the workspace.)
    status = json.loads(dvc(repo, "status", "--json"))
    reading_frames = {stage for stage, changes in status.items() for change in changes if isinstance(change, dict)
                      and any(path.startswith("data/frames") for path in change.get("changed deps", {}))}
    assert reading_frames == {"embed", "train_vlm", "align_vlm", "train_t2v", "evaluate_t2v", "evaluate", "push"}, \
        status
    assert not {"collect", "extract", "manifest", "train_seq2seq"} & set(status), status


WEAK_SFT = ("train_vlm.max_steps=150",)   # a weak supervised model (attribute accuracy ~0.5) to align


def test_dpo_and_grpo_queued_on_a_weak_sft_model_move_it_the_right_way_in_one_graph(pipeline):
    """SFT -> DPO / GRPO -> evaluate as two queued experiments, shortened: `dvc exp show` lists both; applied to the
    workspace, the DPO one shows its held-out margin growing, evaluate scoring the aligned model beside the SFT one
    and push exporting the aligned one; the GRPO one, queued up to align_vlm (evaluate and push take its output as
    they take DPO's), shows its reward going up. (README: "Preference and reward tuning" has the full-length runs
    and their gains.)"""
    repo = pipeline["repo"]
    exp_run(repo, *WEAK_SFT, "align_vlm.method=dpo", "align_vlm.learning_rate=0.0005", "align_vlm.max_steps=40",
            "align_vlm.eval_every=10", options=("--queue", "-n", "dpo"))
    # 4 prompts x 8 sampled answers per step: measured here, the sampled answers' attribute reward rises from 0.38
    # to 0.42 (first and last 10 steps) at learning rates 1e-4 and 2e-4 and at 8 prompts per step alike
    exp_run(repo, *WEAK_SFT, "align_vlm.method=grpo", "align_vlm.learning_rate=0.0001", "align_vlm.max_steps=30",
            "align_vlm.batch_size=32", options=("--queue", "-n", "grpo", "align_vlm"))
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 1200
    while re.search(r"\b(Queued|Running)\b", dvc(repo, "queue", "status")):
        assert time.monotonic() < deadline, "queued experiments did not finish in 20 minutes"
        time.sleep(5)
    assert "Failed" not in dvc(repo, "queue", "status")
    table = list(csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv", "--no-pager"))))
    shown = {row["Experiment"]: row for row in table if row["Experiment"] in ("dpo", "grpo")}
    assert {name: row["align_vlm.method"] for name, row in shown.items()} == {"dpo": "dpo", "grpo": "grpo"}
    assert 0 <= float(shown["dpo"]["vlm.attribute_accuracy"]) <= 1
    # the queue runs in order: the weak SFT model trained for DPO is restored from the run cache for GRPO
    dpo, grpo = (ran(dvc(repo, "queue", "logs", name)) for name in ("dpo", "grpo"))
    assert {"train_vlm", "align_vlm", "evaluate", "push"} <= dpo, dpo
    assert "align_vlm" in grpo and not {"train_vlm", "evaluate", "push"} & grpo, grpo

    dvc(repo, "exp", "apply", "dpo")
    margins = read_curve(repo / "dvclive/align_vlm/plots/metrics/eval/rewards/margins.tsv")
    assert [step for step, _ in margins] == [10, 20, 30, 40] and 0 < margins[0][1] < margins[-1][1], margins
    assert set(json.loads((repo / "eval/metrics.json").read_text())) >= {"vlm", "vlm_sft", "vlm_untrained"}
    assert "Aligned with DPO (trl) by the `align_vlm` stage" in (repo / "export/vlm/README.md").read_text()

    dvc(repo, "exp", "apply", "grpo")
    curves = repo / "dvclive/align_vlm/plots/metrics/train"
    reward = [value for _, value in read_curve(curves / "rewards/attribute/mean.tsv")]
    assert sum(reward[-10:]) > sum(reward[:10]), reward
    assert read_curve(curves / "kl.tsv")


def test_lora_on_cached_vision_features_is_evaluated_and_exported_as_an_adapter(pipeline):
    """LoRA with the tower frozen, the setup the vision-feature cache is for: embed caches, train_vlm never runs the
    tower, and the export is a plain adapter that needs no cache."""
    repo = pipeline["repo"]
    output = exp_run(repo, "train_vlm.finetune=lora", "train_vlm.max_steps=20", "train_vlm.freeze_vision=true",
                     "train_vlm.cache_vision=true")
    assert {"embed", "train_vlm", "evaluate", "push"} <= ran(output)
    counts = json.loads((repo / "models/vlm/training.json").read_text())["vision_cache"]
    assert counts["frames_through_tower"] == 0 and counts["frames_from_cache"] > 0
    assert not (repo / "models/vlm/model").exists() and (repo / "models/vlm/adapter/adapter_model.safetensors").exists()
    assert (repo / "export/vlm/adapter_config.json").exists()
    assert "library_name: peft" in (repo / "export/vlm/README.md").read_text()
    assert json.loads((repo / "eval/metrics.json").read_text())["vlm"].keys() >= {"bleu", "cider_d"}


def test_a_killed_dvc_repro_resumes_training_from_the_last_checkpoint(pipeline):
    repo = pipeline["repo"]
    reset_params(repo)                                  # this test edits params.yaml itself: from the committed one
    yaml_rt = YAML()
    params = yaml_rt.load((repo / "params.yaml").read_text())
    params["train_seq2seq"].update({"max_steps": 300, "eval_every": 50})   # keep: best saves at each evaluation
    with open(repo / "params.yaml", "w") as f:
        yaml_rt.dump(params, f)
    process = subprocess.Popen(["dvc", "repro", "train_seq2seq"], cwd=repo, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    saved = wait_for_checkpoint(process, repo / "checkpoints/train_seq2seq")
    os.killpg(process.pid, signal.SIGKILL)              # kill -9 of dvc and the stage it runs
    process.wait()

    output = dvc(repo, "repro", "train_seq2seq")
    assert ran(output) == {"train_seq2seq"}
    training = json.loads((repo / "models/seq2seq/training.json").read_text())
    assert int(training["resumed_from"].removeprefix("checkpoint-")) >= saved and training["global_step"] == 300
    assert not (repo / "checkpoints").exists() and not list((repo / "models").rglob("checkpoint-*"))
