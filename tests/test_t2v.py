import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from ruamel.yaml import YAML

from stages.models import t2v
from stages.models.tiny import train_tokenizer
from stages.training import diffusion
from tests.helpers import REPO

CAPTIONS = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]


def tiny_pipeline(name: str, num_frames: int, side: int = 32):
    tiny = YAML().load((REPO / "params.yaml").read_text())["train_t2v"]["tiny"]
    tokenizer = train_tokenizer(CAPTIONS, tiny["vocab_size"])
    tokenizer.model_max_length = tiny["max_text_tokens"]
    fam = t2v.family(name)
    torch.manual_seed(0)
    pipe = fam.PIPELINE(**fam.build_tiny(tiny, tokenizer, side, num_frames))
    pipe.set_progress_bar_config(disable=True)
    return fam, pipe


def test_the_registry_and_the_params_schema_name_the_same_families():
    schema = json.loads((REPO / "stages/schema/params/train_t2v.json").read_text())
    assert schema["properties"]["family"]["enum"] == list(t2v.FAMILIES)
    assert all(isinstance(module, t2v.Family) for module in t2v.FAMILIES.values())
    with pytest.raises(ValueError, match="valid families: animatediff, wan"):
        t2v.family("svd")


def test_flow_matching_trains_on_the_velocity_along_a_straight_path_with_the_samplers_shift():
    x0, noise = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), -1.0)
    noisy, timesteps, target = diffusion.training_pair(FlowMatchEulerDiscreteScheduler(shift=3.0), x0, noise,
                                                       torch.tensor([0.5]))
    sigma = 3 * 0.5 / (1 + 2 * 0.5)                     # 0.75: the shift moves draws toward the noisy end
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * noise)
    assert torch.allclose(target, noise - x0) and timesteps.item() == pytest.approx(750)


def test_ddpm_epsilon_trains_on_the_noise_at_the_drawn_step():
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.full((1, 4), 0.5), torch.full((1, 4), 1.5)
    noisy, timesteps, target = diffusion.training_pair(scheduler, x0, noise, torch.tensor([0.25]))
    alpha_bar = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000))[250]
    assert timesteps.item() == 250 and torch.equal(target, noise)
    assert torch.allclose(noisy, torch.tensor(np.sqrt(alpha_bar) * 0.5 + np.sqrt(1 - alpha_bar) * 1.5).float())


def test_zero_terminal_snr_v_prediction_sees_pure_noise_at_the_last_step_and_targets_minus_the_clip():
    _, pipe = tiny_pipeline("animatediff", 4)           # the family's own scheduler
    x0, noise = torch.full((1, 4), 0.5), torch.full((1, 4), 1.5)
    noisy, timesteps, target = diffusion.training_pair(pipe.scheduler, x0, noise, torch.tensor([0.9999, 0.3]))
    assert timesteps.tolist() == [999, 300]
    # v = sqrt(a) e - sqrt(1 - a) x0, and a = 0 at the last step: the clip cannot leak into it
    assert torch.allclose(noisy[0], noise[0]) and torch.allclose(target[0], -x0[0])
    alpha_bar = pipe.scheduler.alphas_cumprod[300]
    assert torch.allclose(target[1], alpha_bar.sqrt() * noise[0] - (1 - alpha_bar).sqrt() * x0[0])


def test_the_vae_weighs_the_subject_by_its_distance_from_the_frames_median_colour():
    frame = torch.full((1, 3, 8, 8), -0.8)                # a dark background ...
    frame[0, :, 2:4, 3:6] = torch.tensor([0.9, -0.9, -0.9]).view(3, 1, 1)   # ... and a red block of 6 pixels
    frame[0, 0, 7, 7] = -0.75                             # noise on the background is not the subject
    weights = diffusion.foreground_weights(frame, 30.0)
    assert weights.shape == (1, 1, 8, 8)
    assert (weights[0, 0, 2:4, 3:6] == 31).all() and weights.sum() == 64 + 6 * 30
    clip = frame[:, :, None].repeat(2, 1, 3, 1, 1)         # a video VAE's input [b, 3, f, h, w]: per frame alike
    assert (diffusion.foreground_weights(clip, 30.0) == weights[:, :, None]).all()
    assert (diffusion.foreground_weights(frame, 0.0) == 1).all()


@pytest.mark.parametrize("name,frames,side,rule", [
    ("wan", 4, 32, "4k \\+ 1 frames"), ("wan", 5, 36, "multiples of 8"),
    ("animatediff", 4, 36, "multiples of 8"), ("animatediff", 40, 32, "holds 32")])
def test_clip_shapes_the_family_cannot_take_are_refused_with_the_rule(name, frames, side, rule):
    fam, pipe = tiny_pipeline(name, 5)
    with pytest.raises(ValueError, match=rule):
        fam.check_shape(pipe, frames, side, side)


def test_a_caption_over_the_text_encoders_limit_stops_naming_the_sample():
    _, pipe = tiny_pipeline("animatediff", 4)
    rows = [{"id": "ok", "target": CAPTIONS[0]}, {"id": "long-one", "target": " ".join(CAPTIONS * 3)}]
    with pytest.raises(SystemExit, match="sample long-one: its caption has \\d+ tokens, over the text encoder's "
                                         "limit of 16"):
        t2v.check_captions(pipe, rows)


@pytest.mark.parametrize("name,frames", [("animatediff", 4), ("wan", 5)])
def test_training_conditions_on_exactly_the_embeddings_generation_passes_the_denoiser(name, frames, tmp_path):
    fam, pipe = tiny_pipeline(name, frames)
    pipe.save_pretrained(tmp_path)
    pipe = t2v.load_pipeline(fam, tmp_path)             # by path, as every stage loads it
    pipe.set_progress_bar_config(disable=True)
    seen = []
    denoiser = getattr(pipe, fam.DENOISER)
    denoiser.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["encoder_hidden_states"]),
                                   with_kwargs=True)
    clips = diffusion.generate(pipe, fam, CAPTIONS[:2], frames, 32, steps=2, guidance=1.0, seed=0)
    assert clips.shape == (2, frames, 32, 32, 3) and clips.dtype == np.uint8
    with torch.no_grad():
        trained_on = fam.text_embeddings(pipe, CAPTIONS[:2])
    if name == "animatediff":                            # the UNet takes one copy per frame
        trained_on = trained_on.repeat_interleave(frames, dim=0)
    assert torch.equal(seen[0], trained_on)


@pytest.mark.parametrize("name,frames", [("animatediff", 4), ("wan", 5)])
def test_latents_decode_back_through_the_pipelines_own_normalisation(name, frames):
    fam, pipe = tiny_pipeline(name, frames)
    clips = np.random.default_rng(0).integers(0, 256, (8, frames, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        fam.fit_latent_statistics(pipe, diffusion.to_pixels(clips))
        latents = diffusion.encode_clips(pipe, fam, clips)
    assert latents.std().item() == pytest.approx(1.0, abs=0.05)   # unit variance, as the denoiser expects
    decoded = pipe(prompt=CAPTIONS[:1], num_frames=frames, height=32, width=32, num_inference_steps=1,
                   output_type="latent", **fam.generation_arguments(pipe)).frames
    assert decoded.shape[1:] == latents.shape[1:] if name == "wan" else decoded.shape[2] == latents.shape[2]
