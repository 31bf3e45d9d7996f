"""Diffusion training, shared by every text-to-video family: the tiny VAE trained first, the clips encoded once into
latents, and the objective the Trainer optimises.

The objective is the scheduler's own definition, so that training and the exported pipeline's sampler agree:
- a flow-matching scheduler (Wan): x_t = (1 - s) x_0 + s e on a straight path, target the velocity e - x_0, s drawn
  with the sampler's shift (more of the noisy end, where layout and motion are decided);
- a DDPM-family scheduler (AnimateDiff): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e, target e (epsilon) or the velocity
  sqrt(a_t) e - sqrt(1 - a_t) x_0 (v_prediction), as its config says.
The caption is replaced by the empty prompt's embedding for `caption_dropout` of the samples, which classifier-free
guidance at generation needs (the pipelines' negative prompt is "").
"""
import os

import numpy as np
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup


def is_flow(scheduler) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or \
        getattr(scheduler.config, "prediction_type", None) == "flow_prediction"


def training_pair(scheduler, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
    """(noisy latents, model timesteps, target) for clean `latents`, `noise` and uniform draws `u` in [0, 1), one per
    sample: the one place where the training target is defined."""
    view = (-1,) + (1,) * (latents.dim() - 1)
    if is_flow(scheduler):
        shift = scheduler.config.shift
        sigma = shift * u / (1 + (shift - 1) * u)        # the sampler's time shift, applied to the draws
        s = sigma.view(view)
        return (1 - s) * latents + s * noise, sigma * scheduler.config.num_train_timesteps, noise - latents
    ddpm = DDPMScheduler.from_config(scheduler.config)   # the sampler's betas; add_noise / get_velocity are DDPM's
    steps = (u * ddpm.config.num_train_timesteps).long().clamp(max=ddpm.config.num_train_timesteps - 1)
    noisy = ddpm.add_noise(latents, noise, steps)
    kind = ddpm.config.prediction_type
    if kind == "epsilon":
        return noisy, steps, noise
    if kind == "v_prediction":
        return noisy, steps, ddpm.get_velocity(latents, noise, steps)
    raise ValueError(f"scheduler prediction_type {kind!r}: training supports epsilon, v_prediction and flow matching")


class Objective(torch.nn.Module):
    """What the Trainer optimises: the denoiser's mean squared error on the scheduler's target. `captions` [k, l, d]
    holds the embedding of every caption, the empty prompt's at index 0; a batch names its rows by index. Evaluation
    draws the same noise every time (a fixed generator), so that validation losses compare across steps."""

    def __init__(self, fam, denoiser, scheduler, captions: torch.Tensor, caption_dropout: float):
        super().__init__()
        self.fam, self.denoiser, self.scheduler, self.dropout = fam, denoiser, scheduler, caption_dropout
        self.register_buffer("captions", captions, persistent=False)

    def forward(self, latents: torch.Tensor, caption: torch.Tensor, return_loss: bool = True):
        # `return_loss` tells the Trainer that this model computes its loss without labels (it then evaluates it)
        generator = None if self.training else torch.Generator(latents.device).manual_seed(0)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        u = torch.rand(len(latents), generator=generator, device=latents.device)
        if self.training and self.dropout:
            caption = torch.where(torch.rand(len(caption), device=caption.device) < self.dropout, 0, caption)
        noisy, timesteps, target = training_pair(self.scheduler, latents, noise, u)
        prediction = self.fam.denoise(self.denoiser, noisy, timesteps, self.captions[caption].to(latents.dtype))
        return {"loss": torch.nn.functional.mse_loss(prediction.float(), target.float())}


class LatentClips(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, captions: list[int]):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, index):
        return {"latents": self.latents[index], "caption": self.captions[index]}


@torch.no_grad()
def encode_clips(pipe, fam, clips: np.ndarray, batch: int = 64) -> torch.Tensor:
    """uint8 clips [n, f, h, w, 3] -> normalised latents [n, c, f', h', w'] (the VAE is frozen while the denoiser
    trains, so each clip is encoded once)."""
    return torch.cat([fam.to_latents(pipe, to_pixels(clips[i:i + batch]).to(pipe.vae.device)).cpu()
                      for i in range(0, len(clips), batch)])


def device() -> torch.device:
    """This process's GPU (an engine's LOCAL_RANK), else the CPU: where the frozen encoders and generation run."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def to_pixels(clips: np.ndarray) -> torch.Tensor:
    """uint8 [n, f, h, w, 3] -> float [n, 3, f, h, w] in [-1, 1], the VAEs' input range."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def train_vae(pipe, fam, clips: np.ndarray, steps: int, batch: int, learning_rate: float, foreground: float,
              seed: int) -> list[float]:
    """Train the tiny default's VAE to reconstruct the training clips (squared error, weighted to the subject by
    `foreground_weights`, with a KL weight small enough to keep the latents informative), then store its latent
    normalisation. Returns the loss every 50 steps.

    A warm-up to `learning_rate` and a cosine decay to 0, over small batches: at a constant rate the colours
    keep wobbling around their values, and a blob's colour is what the clips' captions name. The default's image
    VAE, its reconstructions of the test clips read back by the analyser: colour 0.66 after 250 steps of 16 clips at
    a constant rate (50 s), 0.85 after 1,200 steps of 4 with the decay (78 s), 0.93 with the foreground weight
    below at 30 (the same steps)."""
    vae, generator, losses = pipe.vae.train(), torch.Generator().manual_seed(seed), []
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    for step in tqdm(range(steps), desc="train_t2v: VAE", unit="step", mininterval=2):
        pixels = to_pixels(clips[torch.randint(len(clips), (batch,), generator=generator).numpy()])
        pixels = fam.vae_input(pixels)
        posterior = vae.encode(pixels).latent_dist
        weights = foreground_weights(pixels, foreground)
        error = (vae.decode(posterior.sample(generator)).sample - pixels) ** 2
        loss = (weights * error).mean() / weights.mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 5))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        fam.fit_latent_statistics(pipe, to_pixels(clips[:256]))
    return losses


FOREGROUND_DISTANCE = 0.3   # summed |RGB - median| on the [-1, 1] scale (about 38 of 255): the blob, not the noise


def foreground_weights(pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel weights of the VAE's reconstruction error: 1 + `weight` where a pixel's colour is far from its
    frame's median colour (the background, in a clip whose subject covers less than half the frame), else 1.

    Plain MSE is mostly background: the blob whose colour a caption names covers about an eighth of the frame, so
    its colour settles last and near colours (blue and purple, yellow and orange) stay confused. `pixels` are the
    VAE's input, channels second ([n, 3, h, w] or [b, 3, f, h, w]), in [-1, 1]."""
    background = pixels.flatten(-2).median(-1).values[..., None, None]
    far = (pixels - background).abs().sum(1, keepdim=True) > FOREGROUND_DISTANCE
    return 1 + weight * far.to(pixels.dtype)


@torch.no_grad()
def generate(pipe, fam, prompts: list[str], num_frames: int, side: int, steps: int, guidance: float, seed: int,
             batch: int = 32) -> np.ndarray:
    """The pipeline's own generation, one seeded generator per batch: uint8 clips [n, f, h, w, 3]."""
    clips = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        frames = pipe(prompt=prompts[start:start + batch], num_frames=num_frames, height=side, width=side,
                      num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
                      **fam.generation_arguments(pipe)).frames
        clips.append(np.asarray(frames))
    return (np.concatenate(clips) * 255).round().clip(0, 255).astype(np.uint8)
