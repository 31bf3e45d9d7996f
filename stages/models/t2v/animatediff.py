"""AnimateDiff: a Stable Diffusion UNet with a motion adapter (temporal attention after each spatial block), an
image VAE applied frame by frame, and a frozen CLIP text encoder; trained on the target its scheduler names (SD 1.5's:
epsilon; the tiny default's: v-prediction, on betas rescaled to zero terminal SNR).

Presets: the SD 1.5 UNet with guoyww/animatediff-motion-adapter-v1-5-2 (README). With `finetune: motion_only` only
the motion modules train, AnimateDiff's own recipe; the tiny default trains everything, having no pretrained UNet.
"""
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

PIPELINE = AnimateDiffPipeline
DENOISER = "unet"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_tiny(p: dict, tokenizer, frame_size: int, num_frames: int) -> dict:
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=p["text_hidden"], intermediate_size=2 * p["text_hidden"],
        num_hidden_layers=p["text_layers"], num_attention_heads=p["heads"],
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    channels = p["channels"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=p["latent_channels"], block_out_channels=p["vae_channels"],
        down_block_types=["DownEncoderBlock2D"] * len(p["vae_channels"]),
        up_block_types=["UpDecoderBlock2D"] * len(p["vae_channels"]), layers_per_block=1, norm_num_groups=8,
        sample_size=frame_size)
    unet = UNet2DConditionModel(
        sample_size=frame_size // 2 ** (len(p["vae_channels"]) - 1), in_channels=p["latent_channels"],
        out_channels=p["latent_channels"], block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(channels) - 1),
        cross_attention_dim=p["text_hidden"], attention_head_dim=channels[0] // p["heads"])
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=1,
                            motion_num_attention_heads=p["heads"], motion_norm_num_groups=8,
                            motion_max_seq_length=max(32, num_frames))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
            "unet": UNetMotionModel.from_unet2d(unet, adapter), "motion_adapter": adapter,
            # AnimateDiff's betas, rescaled to zero terminal SNR (Lin et al. 2024): on 8x8 latents SD's last step
            # still shows the clip's colour and place, so a model trained on it never learns to choose them from
            # the caption, and sampling from pure noise then gets them at random. Zero SNR needs v-prediction and
            # trailing timesteps (the sampler starts at the very last one). Training takes the same betas.
            "scheduler": DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                       rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                       timestep_spacing="trailing")}


def vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def check_shape(pipe, num_frames: int, height: int, width: int) -> None:
    multiple = vae_factor(pipe) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if height % multiple or width % multiple:
        raise ValueError(f"animatediff: frames of {width}x{height} px: both sides must be multiples of {multiple} "
                         f"(the VAE's {vae_factor(pipe)}x times the UNet's downsampling)")
    longest = pipe.unet.config.motion_max_seq_length
    if num_frames > longest:
        raise ValueError(f"animatediff: {num_frames} frames: the motion modules' position table holds {longest}")


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """An image VAE: clips [b, 3, f, h, w] -> frames [b * f, 3, h, w]."""
    b, c, f, h, w = pixels.shape
    return pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def raw_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    b, f = pixels.shape[0], pixels.shape[2]
    latents = pipe.vae.encode(vae_input(pixels)).latent_dist.mean
    return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)


def to_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    return raw_latents(pipe, pixels) * pipe.vae.config.scaling_factor   # the pipeline divides by it to decode


def fit_latent_statistics(pipe, pixels: torch.Tensor) -> None:
    """Unit-variance latents, as SD's 0.18215 does for its VAE: the factor is measured on the tiny VAE's latents."""
    pipe.vae.register_to_config(scaling_factor=1.0 / raw_latents(pipe, pixels).std().item())


def denoise(denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    # the UNet folds frames into the batch: each frame attends to its clip's caption
    return denoiser(noisy, timesteps, encoder_hidden_states=text.repeat_interleave(noisy.shape[2], dim=0)).sample


def text_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]


def generation_arguments(pipe) -> dict:
    return {}

