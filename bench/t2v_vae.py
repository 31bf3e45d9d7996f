"""How fast each tiny VAE learns to keep what the captions name: the blob's colour and its direction.

Issue 18's goal (colour >= 0.9, direction >= 0.7) is capped by the VAE: the denoiser trains on its latents and
generation decodes through it, so a colour its reconstructions confuse is one no trained model can show. The Wan
family (the one whose transformer learns motion) ships a causal video VAE, `AutoencoderKLWan`; the AnimateDiff
family an image VAE, `AutoencoderKL`. Each variant here is trained by train_t2v's own `diffusion.train_vae` (its
foreground-weighted error and its schedule, params.yaml's `train_t2v.tiny`), then reconstructs the held-out clips,
which stages/results/motion.py reads as it reads generated ones.

Clips: the synthetic set's plan (params.yaml's `collect`), 5 frames each (Wan's 4k + 1), drawn straight to RGB by
stages/data/synthetic.draw at 5 times spread evenly from the first frame's to the last's (not rounded to frame
times, as extract's uniform_indices rounds them) and scaled to extract's size with PIL's bicubic (not libswscale's),
without the H.264 round trip; the synthetic splits, test clips held out.

    python bench/t2v_vae.py                       # every variant (about 20 min on 2 cores)
    python bench/t2v_vae.py --variants wan wan_patch2

Prints a table and writes bench/results/t2v_vae.json: per variant, colour and direction accuracy of the
reconstructions, the colour read from each frame alone, the training seconds and the date (one run each, seeded; a
run of some variants keeps the others' results).
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import stages.common.console  # noqa: E402,F401  # isort: skip  (first: quiets what libraries print on import)
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d  # noqa: E402

from stages.data import synthetic  # noqa: E402
from stages.models.t2v import animatediff, wan  # noqa: E402
from stages.models.tiny import train_tokenizer  # noqa: E402
from stages.results import motion  # noqa: E402
from stages.training import diffusion  # noqa: E402

FRAMES = 5


def synthetic_clips(p: dict, side: int, seed: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """split -> (uint8 clips [n, 5, side, side, 3], their attributes): drawn at collect's size, then scaled to
    extract's `side` (PIL's bicubic)."""
    plan = synthetic.plan_clips(p, seed)
    splits = synthetic.assign_splits(len(plan), p["val_fraction"], p["test_fraction"], seed)
    last = (round(p["seconds"] * p["fps"]) - 1) / p["fps"]        # the last frame's time
    times = np.linspace(0, last, FRAMES)
    out = {}
    for split in ("train", "test"):
        chosen = [clip for clip, s in zip(plan, splits) if s == split]
        clips = np.stack([[np.asarray(Image.fromarray(synthetic.draw(c, p["frame_size"], t, p["seconds"]))
                                      .resize((side, side), Image.BICUBIC)) for t in times] for c in chosen])
        out[split] = clips, [{key: c[key] for key in ("color", "shape", "direction")} for c in chosen]
    return out


def wan_vae(channels: list[int], latent: int, patch: int = 1, residual: bool = False) -> AutoencoderKLWan:
    """wan.build_tiny's VAE with the two knobs the stage does not expose: the latent width, and pixels folded
    `patch` x `patch` into channels before the first convolution (Wan 2.2's `patch_size`), so that the convolutions
    see a `patch` times smaller side."""
    down = len(channels) - 1
    return AutoencoderKLWan(
        base_dim=channels[0], z_dim=latent, dim_mult=[c // channels[0] for c in channels], num_res_blocks=1,
        temperal_downsample=[False] * (down - 1) + [True], latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
        scale_factor_temporal=2, scale_factor_spatial=patch * 2 ** down, patch_size=patch if patch > 1 else None,
        in_channels=3 * patch * patch, out_channels=3 * patch * patch, is_residual=residual)


def frame_by_frame(vae: AutoencoderKLWan, hold: bool = False) -> None:
    """Zero every causal convolution's taps on earlier frames, so that the VAE starts as a per-frame image VAE;
    `hold`: and keep them at zero (only the temporal resampling's convolutions then mix frames)."""
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, WanCausalConv3d) and module.kernel_size[0] == 3 and "time_conv" not in name:
                module.weight[:, :, :2] = 0
                if hold:
                    module.weight.register_hook(lambda grad: torch.cat([grad[:, :, :2] * 0, grad[:, :, 2:]], 2))


def train(variant: str, pipe, fam, clips: np.ndarray, tiny: dict) -> None:
    """Train `pipe.vae` as `variant` says, with diffusion.train_vae."""
    def run(data, steps, batch, rate, seed=0):
        pipe.vae.requires_grad_(True)
        diffusion.train_vae(pipe, fam, data, steps, batch, rate, tiny["vae_foreground_weight"], seed)
    rate, batch = tiny["vae_learning_rate"], tiny["vae_batch_size"]
    if variant.startswith("wan_frames"):   # single frames (the first-frame path) first, then whole clips; "held":
        frame_by_frame(pipe.vae, hold="held" in variant)   # the taps on earlier frames stay at zero throughout
        run(clips.reshape(-1, 1, *clips.shape[2:]), 600 if variant.endswith("600") else 1200, 16, rate)
        run(clips, 300, batch, rate / 2, seed=1)
    else:
        run(clips, STEPS[variant], batch, rate)


STEPS = {"image": 1200, "wan": 600, "wan_1200": 1200, "wan_z16": 600, "wan_patch2": 600, "wan_patch2_1200": 1200,
         "wan_residual": 600, "wan_residual_patch2": 600}
VARIANTS = [*STEPS, "wan_frames_first", "wan_frames_held", "wan_frames_held_600"]


def build(variant: str, tiny: dict, train_clips: np.ndarray, captions: list[str]):
    tokenizer = train_tokenizer(captions, tiny["vocab_size"])   # the text side does not train here
    tokenizer.model_max_length = tiny["max_text_tokens"]
    fam = animatediff if variant == "image" else wan
    pipe = fam.PIPELINE(**fam.build_tiny(tiny, tokenizer, train_clips.shape[2], FRAMES))
    if variant.startswith("wan_z16"):
        pipe.vae = wan_vae(tiny["vae_channels"], 16)
    elif "patch2" in variant or "residual" in variant:   # folding 2 x 2 pixels takes the place of the first block
        patch = 2 if "patch2" in variant else 1
        pipe.vae = wan_vae(tiny["vae_channels"][patch - 1:], tiny["latent_channels"], patch, "residual" in variant)
    return fam, pipe


@torch.no_grad()
def reconstruct(pipe, fam, clips: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(clips), 64):
        pixels = diffusion.to_pixels(clips[i:i + 64])
        decoded = pipe.vae.decode(pipe.vae.encode(fam.vae_input(pixels)).latent_dist.mean).sample
        if decoded.dim() == 4:   # an image VAE took one frame per row: back to clips [b, 3, f, h, w]
            decoded = decoded.unflatten(0, (len(pixels), -1)).transpose(1, 2)
        out.append(decoded.clamp(-1, 1))
    return ((torch.cat(out).permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def bench(variant: str, tiny: dict, data: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    (train_clips, attributes), (test_clips, asked) = data["train"], data["test"]
    captions = [synthetic.caption(a["color"], a["shape"], a["direction"]) for a in attributes]
    fam, pipe = build(variant, tiny, train_clips, captions)
    start = time.perf_counter()
    train(variant, pipe, fam, train_clips, tiny)
    seconds = time.perf_counter() - start
    recon = reconstruct(pipe, fam, test_clips)
    accuracy = motion.score(recon, asked)[0]
    per_frame = [motion.score(recon[:, k:k + 1], asked)[0]["color_accuracy"] for k in range(FRAMES)]
    return {"date": time.strftime("%Y-%m-%d"), "vae": type(pipe.vae).__name__,
            "parameters": sum(w.numel() for w in pipe.vae.parameters()),
            "train_seconds": round(seconds, 1), **{k: round(v, 3) for k, v in accuracy.items()},
            "color_accuracy_per_frame": [round(v, 3) for v in per_frame]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args()
    params = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    tiny, seed = params["train_t2v"]["tiny"], params["base"]["seed"]
    torch.set_num_threads(2)
    data = synthetic_clips(params["collect"], params["extract"]["frame_size"], seed)
    print(f"clips: train {data['train'][0].shape}, test {data['test'][0].shape}")
    results = {}
    for variant in args.variants:
        results[variant] = bench(variant, tiny, data, seed)
        r = results[variant]
        print(f"{variant:18s} {r['vae']:16s} {r['parameters']:>8,d} params  {r['train_seconds']:6.1f} s  colour "
              f"{r['color_accuracy']:.3f}  direction {r['direction_accuracy']:.3f}  per frame "
              f"{r['color_accuracy_per_frame']}", flush=True)
    out = REPO / "bench/results/t2v_vae.json"
    old = json.loads(out.read_text())["variants"] if out.exists() else {}
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "frames": FRAMES,
                               "variants": {**old, **results}}, indent=2) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
