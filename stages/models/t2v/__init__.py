"""What every text-to-video family shares. A family module names its diffusers pipeline class and the component that
trains, builds its tiny model from config classes, states the frame-shape rule of its VAE and patching, and runs its
denoiser on a batch of training latents. `FAMILIES` (at the bottom) registers them; `family()` is the one place where
`train_t2v.family` takes effect. A new family is one module plus one line in `FAMILIES` (and its name in the params
schema's enum, which a test keeps equal to the registry).

The training objective is the scheduler's (stages/training/diffusion.py): the family only says how its denoiser is
called. Text embeddings come from the pipeline's own `encode_prompt`, so that training conditions on exactly what
generation will.
"""
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from stages.data.frames import load_frames
from stages.data.video import uniform_indices


@runtime_checkable
class Family(Protocol):
    """What a family module provides (a module satisfies this structurally: its constants and functions)."""

    PIPELINE: type           # the diffusers pipeline class that loads the export (DiffusionPipeline resolves it too)
    DENOISER: str            # the pipeline component that trains: "unet" or "transformer"
    LORA_TARGETS: list[str]  # the denoiser's attention projections that LoRA adapts

    def build_tiny(self, p: dict, tokenizer, frame_size: int, num_frames: int) -> dict:
        """Random-init pipeline components (tokenizer, text_encoder, vae, the denoiser, scheduler, ...) of the tiny
        default; `tokenizer` was trained on the captions. The VAE is trained afterwards (diffusion.train_vae)."""

    def check_shape(self, pipe, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError naming the rule when clips of this shape cannot pass the VAE and the denoiser's patching."""

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clips [b, 3, f, h, w] as the VAE takes them (an image VAE: one frame per batch row)."""

    def to_latents(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [b, 3, f, h, w] in [-1, 1] -> the normalised latents the denoiser trains on, as the pipeline decodes
        them."""

    def fit_latent_statistics(self, pipe, pixels: torch.Tensor) -> None:
        """Store in the VAE's config the normalisation that makes the tiny VAE's latents unit-variance."""

    def denoise(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for latents `noisy` [b, c, f, h, w] at `timesteps` [b], text embeddings `text`."""

    def text_embeddings(self, pipe, prompts: list[str]) -> torch.Tensor:
        """Embeddings of `prompts`, computed by the pipeline's own encode_prompt (as generation computes them)."""

    def generation_arguments(self, pipe) -> dict:
        """Keyword arguments every call of the pipeline needs to condition as training did."""


def family(name: str) -> Family:
    """The module of family `name`: the one place where `train_t2v.family` (or a training record's) takes effect."""
    if name not in FAMILIES:
        raise ValueError(f"unknown text-to-video family {name!r}; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


LONGEST_PROMPT = 512   # tokens: WanPipeline's default context; tokenizers without a limit of their own get this one


def text_limit(pipe) -> int:
    """The most tokens a caption may have: the tokenizer's limit, which generation would silently cut at."""
    return min(pipe.tokenizer.model_max_length, LONGEST_PROMPT)


def check_captions(pipe, rows: list[dict]) -> None:
    """A caption longer than the text encoder's limit stops the stage, naming the sample: never a silent cut."""
    limit = text_limit(pipe)
    for row in rows:
        count = len(pipe.tokenizer(row["target"]).input_ids)
        if count > limit:
            raise SystemExit(f"train_t2v: sample {row['id']}: its caption has {count} tokens, over the text "
                             f"encoder's limit of {limit}; shorten it or use a text encoder with a longer context")


def load_clips(rows: list[dict], num_frames: int) -> tuple[list[dict], np.ndarray, list[dict]]:
    """(kept rows, their clips uint8 [n, f, h, w, 3], rejects): `num_frames` frames spread evenly over each row's
    video, first and last included."""
    kept, clips, rejects, shape = [], [], [], None
    for row in rows:
        if len(row["videos"]) != 1:
            rejects.append({"id": row["id"], "reason": f"has {len(row['videos'])} videos; a text-to-video sample is "
                                                       f"one clip and its caption"})
            continue
        frames = load_frames(row)[0]
        if len(frames) < num_frames:
            rejects.append({"id": row["id"], "reason": f"its video has {len(frames)} extracted frames, fewer than "
                                                       f"train_t2v.num_frames={num_frames}"})
            continue
        shape = shape or frames.shape[1:]
        if frames.shape[1:] != shape:
            rejects.append({"id": row["id"], "reason": f"frames of {frames.shape[2]}x{frames.shape[1]} px, not the "
                                                       f"{shape[1]}x{shape[0]} of the first clip"})
            continue
        kept.append(row)
        clips.append(frames[uniform_indices(len(frames), num_frames)])
    return kept, np.stack(clips) if clips else np.zeros((0,)), rejects


def load_pipeline(fam: Family, path: str | Path, **kwargs):
    return fam.PIPELINE.from_pretrained(str(path), **kwargs)


from stages.models.t2v import animatediff, wan  # noqa: E402  (the registry needs the protocol above)

FAMILIES: dict[str, Family] = {"animatediff": animatediff, "wan": wan}
