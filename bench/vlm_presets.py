"""Parameters and computed training memory of the README's real presets of the video families added for issue 19.

Each model is built at its real sizes on PyTorch's meta device (no weights, no memory) from its family's transformers
config class. The config values are transcribed from the released checkpoints' config.json files (this machine cannot
reach the Hub); the vocabulary sizes are the embedding rows of those files. Memory is computed, not measured, as the
README's table is for the older presets: weights, plus 16 bytes (weight, gradient, two AdamW moments in fp32) per
trained parameter (LoRA adapters at r=16 on every linear layer of the language model, and the projector); activations
come on top. bf16 weights take 2 bytes a parameter, NF4 0.5 bytes (plus one fp32 scale per 64 weights, 1/16 byte); QLoRA
quantizes the language model's linear layers only (bitsandbytes leaves embeddings, the output head and the rest).

    python bench/vlm_presets.py

Prints a table and writes bench/results/vlm_presets.json.
"""
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.models import vlm  # noqa: E402

RANK = 16
QWEN3_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17])
INTERN_VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14])


def qwen3_text(hidden, intermediate, layers, heads):
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": [24, 20, 20]})


def qwen2_text(hidden, intermediate, layers, heads, kv, vocab, tied):
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)


# preset name -> (family, config kwargs, preset mode)
PRESETS = {
    "Qwen3-VL-2B-Instruct": ("qwen3_vl", dict(
        text_config=qwen3_text(2048, 6144, 28, 16), tie_word_embeddings=True,
        vision_config={**QWEN3_VISION, "out_hidden_size": 2048}), "lora"),
    "Qwen3-VL-4B-Instruct": ("qwen3_vl", dict(
        text_config=qwen3_text(2560, 9728, 36, 32), tie_word_embeddings=True,
        vision_config={**QWEN3_VISION, "out_hidden_size": 2560}), "qlora"),
    "InternVL3-1B-hf": ("internvl", dict(
        text_config=qwen2_text(896, 4864, 24, 14, 2, 151674, False), vision_config=INTERN_VIT_300M,
        tie_word_embeddings=False), "lora"),
    "InternVL3-2B-hf": ("internvl", dict(
        text_config=qwen2_text(1536, 8960, 28, 12, 2, 151674, False), vision_config=INTERN_VIT_300M,
        tie_word_embeddings=False), "lora"),
    "llava-onevision-qwen2-0.5b-ov-hf": ("llava_onevision", dict(
        text_config=qwen2_text(896, 4864, 24, 14, 2, 152000, True), tie_word_embeddings=True,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
        vision_feature_layer=-1, vision_feature_select_strategy="full"), "lora"),
    "LLaVA-NeXT-Video-7B-hf": ("llava_next_video", dict(
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)), "qlora"),
    # InstructBLIP-Video on Vicuna-7B (Salesforce/instructblip-vicuna-7b, EVA ViT-g): 32 query tokens per frame;
    # its projector is the Q-Former, trained in full beside the adapters
    "InstructBLIP-Video (Vicuna-7B)": ("instructblip_video", dict(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14),
        qformer_config=dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, cross_attention_frequency=2),
        text_config=dict(model_type="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        num_query_tokens=32), "qlora"),
}


def count(name: str) -> dict:
    family, config_kwargs, mode = PRESETS[name]
    fam = vlm.family(family)
    with torch.device("meta"):
        model = fam.MODEL_CLASS(fam.MODEL_CLASS.config_class(**config_kwargs))
    total = sum(w.numel() for w in model.parameters())
    vision = sum(w.numel() for w in model.get_submodule(fam.VISION).parameters())
    projector = sum(w.numel() for w in model.get_submodule(fam.PROJECTOR).parameters())
    if fam.PROJECTOR.startswith(fam.VISION + "."):   # Qwen's merger lives inside its vision tower
        vision -= projector
    head = model.get_output_embeddings()   # inside the language model in InstructBLIP-Video: never adapted
    linears = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(fam.LANGUAGE + ".") and m is not head]
    adapters = sum(RANK * (m.in_features + m.out_features) for m in linears)
    trained = adapters + projector
    if mode == "qlora":   # the language model's linear layers in NF4 (bitsandbytes leaves embeddings and the head)
        quantized = sum(m.weight.numel() for m in linears)
        weights = quantized * (0.5 + 1 / 16) + (total - quantized) * 2
    else:
        weights = total * 2
    return {"family": family, "mode": mode, "parameters_b": total / 1e9, "vision_b": vision / 1e9,
            "trained_b": trained / 1e9, "preset_gb": (weights + 16 * trained) / 1e9, "full_fp32_gb": 16 * total / 1e9}


def main() -> None:
    results = {name: count(name) for name in PRESETS}
    print(f"{'preset':36s} {'params':>8s} {'vision':>8s} {'mode':>6s} {'preset GB':>10s} {'full fp32 GB':>13s}")
    for name, r in results.items():
        print(f"{name:36s} {r['parameters_b']:7.2f}B {r['vision_b']:7.2f}B {r['mode']:>6s} {r['preset_gb']:10.1f} "
              f"{r['full_fp32_gb']:13.0f}")
    out = REPO / "bench/results/vlm_presets.json"
    out.write_text(json.dumps({name: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                               for name, r in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
