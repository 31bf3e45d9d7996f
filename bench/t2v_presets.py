"""Parameters and computed training memory of the README's real text-to-video presets.

Each part is built at its real sizes on PyTorch's meta device (no weights, no memory) from its diffusers or
transformers config class, with the values of the released checkpoints' config files transcribed here (this machine
cannot reach the Hub). Memory is computed, not measured: the denoiser's weights in bf16 (2 bytes a parameter), plus
16 bytes (fp32 weight, gradient, two AdamW moments) per trained parameter. train_t2v encodes every caption and clip
once, before the denoiser trains, so the text encoder and the VAE are not resident while it trains; their bf16 size is
listed for that encoding pass. Activations come on top (they grow with frames x height x width).

    python bench/t2v_presets.py

Prints a table and writes bench/results/t2v_presets.json.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
    WanTransformer3DModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    UMT5Config,
    UMT5EncoderModel,
)

import stages.common.console  # noqa: E402,F401  (first: quiets what libraries print on import and diffusers' notices)
from stages.models import t2v  # noqa: E402

RANK = 16


def animatediff_sd15():
    """runwayml/stable-diffusion-v1-5's UNet, CLIP ViT-L/14 text encoder and VAE, with
    guoyww/animatediff-motion-adapter-v1-5-2's adapter (diffusers' MotionAdapter defaults are that adapter's)."""
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    denoiser = UNetMotionModel.from_unet2d(unet, MotionAdapter())
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    trained = sum(w.numel() for n, w in denoiser.named_parameters() if "motion_modules" in n)
    return denoiser, [text, vae], trained, "motion_only"


def wan_1_3b():
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers: the transformer, UMT5-XXL's encoder and the Wan VAE (diffusers'
    AutoencoderKLWan defaults are that VAE's); LoRA r=16 on every attention projection of the transformer."""
    denoiser = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                     text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
    text = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu"))
    targets = tuple(t2v.family("wan").LORA_TARGETS)
    trained = sum(RANK * (m.in_features + m.out_features) for n, m in denoiser.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.endswith(targets))
    return denoiser, [text, AutoencoderKLWan()], trained, "lora"


def svd_img2vid():
    """stabilityai/stable-video-diffusion-img2vid: its UNet (diffusers' defaults are that model's), the OpenCLIP
    ViT-H/14 image encoder and the temporal-decoder VAE. Not a train_t2v family (see README)."""
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=16,
                                                           patch_size=14, image_size=224, projection_dim=1024))
    denoiser = UNetSpatioTemporalConditionModel()
    return denoiser, [image, AutoencoderKLTemporalDecoder()], sum(w.numel() for w in denoiser.parameters()), "full"


PRESETS = {"AnimateDiff motion adapter on SD 1.5": animatediff_sd15, "Wan2.1-T2V-1.3B": wan_1_3b,
           "Stable Video Diffusion img2vid": svd_img2vid}


def count(build) -> dict:
    with torch.device("meta"):
        denoiser, frozen, trained, mode = build()
    size = sum(w.numel() for w in denoiser.parameters())
    others = sum(w.numel() for part in frozen for w in part.parameters())
    return {"mode": mode, "denoiser_b": size / 1e9, "trained_b": trained / 1e9, "encoders_b": others / 1e9,
            "training_gb": (2 * size + 16 * trained) / 1e9, "encoding_gb": 2 * others / 1e9}


def main() -> None:
    results = {name: count(build) for name, build in PRESETS.items()}
    print(f"{'preset':38s} {'denoiser':>9s} {'trained':>8s} {'mode':>12s} {'train GB':>9s} {'encoders':>9s} "
          f"{'encode GB':>10s}")
    for name, r in results.items():
        print(f"{name:38s} {r['denoiser_b']:8.2f}B {r['trained_b']:7.3f}B {r['mode']:>12s} {r['training_gb']:9.1f} "
              f"{r['encoders_b']:8.2f}B {r['encoding_gb']:10.1f}")
    out = REPO / "bench/results/t2v_presets.json"
    out.write_text(json.dumps({name: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                               for name, r in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
