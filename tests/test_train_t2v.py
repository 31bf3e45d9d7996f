import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.numpy import save_file

from stages import evaluate_t2v, extract, manifest, train_t2v
from stages.common.files import read_jsonl, write_json, write_jsonl
from stages.data import packs
from stages.data.frames import INDEX, load_shard
from stages.models import t2v
from stages.training import diffusion
from stages.training.trainer import CHECKPOINTS
from tests.helpers import SMALL, kill_after_checkpoint, read_curve, write_params

T2V = {**SMALL["train_t2v"], "max_steps": 40, "eval_every": 20, "save_steps": 10}


def use(workspace, **overrides):
    write_params(workspace, {**SMALL, "train_t2v": {**T2V, **overrides}})


def denoiser_weights(path, fam):
    return getattr(t2v.load_pipeline(fam, path), fam.DENOISER).state_dict()


def test_animatediff_learns_on_a_tiny_set_and_exports_a_pipeline_that_diffusers_loads_and_runs(workspace):
    use(workspace)
    train_t2v.main()
    training = json.loads((workspace / "models/t2v/training.json").read_text())
    assert training["family"] == "animatediff" and training["global_step"] == 40
    assert training["clip_shape"] == [4, 32, 32] and training["base_model"] == "models/t2v/base"
    curve = [loss for _, loss in read_curve(workspace / "dvclive/train_t2v/plots/metrics/train/loss.tsv")]
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])          # the loss falls
    pipe = DiffusionPipeline.from_pretrained("models/t2v/pipeline")   # the class comes from model_index.json
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moves left", num_frames=4, height=32, width=32, num_inference_steps=2,
                  output_type="np").frames
    assert frames.shape == (1, 4, 32, 32, 3)
    base = denoiser_weights("models/t2v/base", t2v.family("animatediff"))
    trained = denoiser_weights("models/t2v/pipeline", t2v.family("animatediff"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)


def test_wan_on_five_frame_clips_learns_by_flow_matching_and_loads_as_a_wan_pipeline(workspace):
    write_params(workspace, {**SMALL, "extract": {"num_frames": 5}})
    extract.main()
    manifest.main()
    use(workspace, family="wan", num_frames=5, max_steps=120)   # 60 steps a second here
    train_t2v.main()
    curve = [loss for _, loss in read_curve(workspace / "dvclive/train_t2v/plots/metrics/train/loss.tsv")]
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])
    pipe = DiffusionPipeline.from_pretrained("models/t2v/pipeline")
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.transformer.config.patch_size == [1, 2, 2]
    pipe.set_progress_bar_config(disable=True)
    clips = diffusion.generate(pipe, t2v.family("wan"), ["a red circle moves left"], 5, 32, 2, 1.0, seed=0)
    assert clips.shape == (1, 5, 32, 32, 3)


def test_wan_refuses_four_frame_clips_with_the_rule_before_training(workspace):
    use(workspace, family="wan")
    with pytest.raises(SystemExit, match="4 frames: the VAE encodes the first frame alone and then groups of 4"):
        train_t2v.main()
    assert not (workspace / "models/t2v").exists()


def test_lora_saves_the_adapter_and_a_merged_pipeline(workspace):
    use(workspace, finetune="lora", max_steps=10)
    train_t2v.main()
    fam = t2v.family("animatediff")
    assert (workspace / "models/t2v/adapter/pytorch_lora_weights.safetensors").exists()
    trained = denoiser_weights("models/t2v/pipeline", fam)
    assert not any("lora" in key for key in trained)                  # merged: plain weights only
    base = denoiser_weights("models/t2v/base", fam)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v", "0"} for k in changed)


def test_motion_only_trains_the_motion_modules_and_nothing_else(workspace):
    use(workspace, finetune="motion_only", max_steps=4)
    train_t2v.main()
    fam = t2v.family("animatediff")
    base, trained = denoiser_weights("models/t2v/base", fam), denoiser_weights("models/t2v/pipeline", fam)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all("motion_modules" in k for k in changed)


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_does(workspace, tmp_path):
    use(workspace)
    saved = kill_after_checkpoint("train_t2v", workspace)
    assert not (workspace / "models/t2v").exists()
    train_t2v.main()
    training = json.loads((workspace / "models/t2v/training.json").read_text())
    assert int(training["resumed_from"].removeprefix("checkpoint-")) >= saved and training["global_step"] == 40
    assert not CHECKPOINTS.exists()
    resumed = denoiser_weights("models/t2v/pipeline", t2v.family("animatediff"))
    train_t2v.main()                                                  # the same run, unbroken
    unbroken = denoiser_weights("models/t2v/pipeline", t2v.family("animatediff"))
    assert all(torch.allclose(resumed[k], unbroken[k], atol=1e-5) for k in unbroken)


def test_a_video_with_fewer_frames_than_asked_is_left_out_with_the_reason(workspace):
    rows = read_jsonl(workspace / "data/manifest/train.jsonl")
    frames = workspace / "data/frames"
    short = {key: value[:2] for key, value in load_shard(rows[0]["videos"][0]["frames"], frames).items()}
    shard = frames / f"zz{rows[0]['videos'][0]['sha256'][2:]}.safetensors"   # packed apart, as zz-0.tar
    save_file(short, str(shard))
    index = json.loads((frames / INDEX).read_text())
    write_json(frames / INDEX, {**index, **packs.write(frames, [shard], 1 << 20)})
    rows[0]["videos"][0]["frames"] = shard.name
    write_jsonl(workspace / "data/manifest/train.jsonl", rows)
    use(workspace, max_steps=2)
    train_t2v.main()
    rejects = read_jsonl(workspace / "models/t2v/rejects.jsonl")
    assert [r["id"] for r in rejects] == [rows[0]["id"]]
    assert rejects[0]["reason"] == "its video has 2 extracted frames, fewer than train_t2v.num_frames=4"
    training = json.loads((workspace / "models/t2v/training.json").read_text())
    assert training["rejected"] == 1


def test_a_caption_over_the_text_limit_stops_the_stage_naming_the_sample(workspace):
    rows = read_jsonl(workspace / "data/manifest/val.jsonl")
    rows[1]["target"] = "a red circle moves left " * 8
    write_jsonl(workspace / "data/manifest/val.jsonl", rows)
    use(workspace, max_steps=2)
    with pytest.raises(SystemExit, match=f"sample {rows[1]['id']}: its caption has \\d+ tokens, over the text "
                                         f"encoder's limit of 16"):
        train_t2v.main()


def test_evaluate_scores_the_trained_model_and_its_untrained_twin_and_saves_a_strip_per_caption(workspace):
    use(workspace, max_steps=4)
    train_t2v.main()
    evaluate_t2v.main()
    metrics = json.loads((workspace / "eval/t2v/metrics.json").read_text())
    assert set(metrics) == {"t2v", "t2v_untrained", "real"}
    assert metrics["real"] == {"color_accuracy": 1.0, "direction_accuracy": 1.0}   # the analyser, on real clips
    assert set(metrics["t2v"]) == {"color_accuracy", "direction_accuracy", "frechet_distance"}
    captions = sorted({row["target"] for row in read_jsonl(workspace / "data/manifest/test.jsonl")})
    strips = sorted(p.name for p in (workspace / "eval/t2v/strips").iterdir())
    assert strips == sorted(f"{c.replace(' ', '_')}.png" for c in captions)
    clips = read_jsonl(workspace / "eval/t2v/clips.jsonl")
    assert len(clips) == 2 * len(captions) and {c["model"] for c in clips} == {"t2v", "t2v_untrained"}
