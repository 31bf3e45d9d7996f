"""Wan: a video transformer over 3D patches of a causal video VAE's latents (first frame alone, then groups of
four), conditioned on UMT5 text embeddings through cross-attention, and trained by flow matching (velocity = noise -
clip along a straight path).

Presets: Wan-AI/Wan2.1-T2V-1.3B-Diffusers with LoRA (README). Clips need 4k + 1 frames (the VAE's grouping), so set
extract.num_frames (or train_t2v.num_frames) to 5, 9, ... 81.
"""
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from stages.models import t2v

PIPELINE = WanPipeline
DENOISER = "transformer"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FRAME_GROUP = 4   # the VAE encodes the first frame alone, then groups of this many


def build_tiny(p: dict, tokenizer, frame_size: int, num_frames: int) -> dict:
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=p["text_hidden"], d_kv=p["text_hidden"] // p["heads"],
        d_ff=2 * p["text_hidden"], num_layers=p["text_layers"], num_heads=p["heads"],
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    downsamplings = len(p["vae_channels"]) - 1
    vae = AutoencoderKLWan(
        base_dim=p["vae_channels"][0], z_dim=p["latent_channels"],
        dim_mult=[c // p["vae_channels"][0] for c in p["vae_channels"]], num_res_blocks=1,
        temperal_downsample=[False] * (downsamplings - 1) + [True],   # 4k + 1 frames -> 2k + 1 latent frames
        latents_mean=[0.0] * p["latent_channels"], latents_std=[1.0] * p["latent_channels"],
        scale_factor_temporal=2, scale_factor_spatial=2 ** downsamplings)
    heads = p["heads"]
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=p["channels"][-1] // heads,
        in_channels=p["latent_channels"], out_channels=p["latent_channels"], text_dim=p["text_hidden"],
        freq_dim=64, ffn_dim=4 * p["channels"][-1], num_layers=p["transformer_layers"], rope_max_seq_len=64)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=p["flow_shift"])}


def check_shape(pipe, num_frames: int, height: int, width: int) -> None:
    if (num_frames - 1) % FRAME_GROUP:
        raise ValueError(f"wan: {num_frames} frames: the VAE encodes the first frame alone and then groups of "
                         f"{FRAME_GROUP}, so clips need 4k + 1 frames (5, 9, ..., 81)")
    multiple = pipe.vae.config.scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if height % multiple or width % multiple:
        raise ValueError(f"wan: frames of {width}x{height} px: both sides must be multiples of {multiple} "
                         f"(the VAE's {pipe.vae.config.scale_factor_spatial}x times the patch size)")


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    return pixels   # a video VAE takes the clips whole


def raw_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    return pipe.vae.encode(pixels).latent_dist.mean


def to_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(pipe.vae.config[key]).view(1, -1, 1, 1, 1) for key in ("latents_mean", "latents_std"))
    return (raw_latents(pipe, pixels) - mean) / std    # WanPipeline undoes exactly this before decoding


def fit_latent_statistics(pipe, pixels: torch.Tensor) -> None:
    """Per-channel mean and std of the tiny VAE's latents, where Wan's VAE ships its measured ones."""
    latents = raw_latents(pipe, pixels).transpose(0, 1).flatten(1)
    pipe.vae.register_to_config(latents_mean=latents.mean(1).tolist(), latents_std=latents.std(1).tolist())


def denoise(denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return denoiser(noisy, timesteps, encoder_hidden_states=text).sample


def text_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.text_encoder.device,
                              **generation_arguments(pipe))[0]


def generation_arguments(pipe) -> dict:
    # Wan's cross-attention has no mask: the zero padding up to this length is part of the condition, so training
    # and every generation use the same length
    return {"max_sequence_length": t2v.text_limit(pipe)}
