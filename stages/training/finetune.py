"""How much of a vision-language model trains, and in what precision: `train_vlm.finetune` full, lora or qlora (peft),
the freeze_vision / train_projector switches, bf16, attention implementation, and what gets saved (the full model, or
the adapter and optionally the base with the adapter merged in).

Each family module names its three parts (VISION, PROJECTOR, LANGUAGE); everything here works from those names.
"""
import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from stages.models import vlm
from stages.training.distributed import is_main_process
from stages.training.trainer import save_model, use_bf16


def load(fam, base: str, p: dict):
    """The base model: in 4 bits for qlora (the vision tower and projector stay unquantized), in bf16 for lora with
    bf16 (the frozen base needs no float32 master copy), else in float32."""
    extra = {"dtype": torch.bfloat16} if p["finetune"] == "lora" and use_bf16(p) else {}
    if p["finetune"] == "qlora":
        if not torch.cuda.is_available():
            raise SystemExit("train_vlm: finetune=qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA "
                             "GPU, and this machine has none. Use finetune: lora (same adapters, full-precision base).")
        compute = torch.bfloat16 if use_bf16(p) else torch.float32
        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # InstructBLIP-Video's language_projection is the last linear of its bridge, outside the Q-Former
            llm_int8_skip_modules=[fam.VISION, fam.PROJECTOR, "lm_head", "language_projection"]),
            "dtype": compute, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}  # this process's GPU
    model = vlm.load_model(fam, base, attn_implementation=p["attn_implementation"], **extra)
    if p["finetune"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p["gradient_checkpointing"])
        align_dtypes(model, fam)
    return model


def prepare(model, fam, p: dict):
    """Mark what trains. full: every weight, less the vision tower (freeze_vision) and the projector (unless
    train_projector). lora/qlora: adapters on the target modules, plus the projector trained in full."""
    if p["finetune"] == "full":
        model.get_submodule(fam.VISION).requires_grad_(not p["freeze_vision"])
        model.get_submodule(fam.PROJECTOR).requires_grad_(p["train_projector"])
        return model
    lora = p["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora_targets(model, fam, p), task_type="CAUSAL_LM",
                        modules_to_save=[fam.PROJECTOR] if p["train_projector"] else None)
    return get_peft_model(model, config)


def lora_targets(model, fam, p: dict) -> list[str] | str:
    """`lora.target_modules: auto`: every linear layer of the language model, and of the vision tower unless it is
    frozen; never the projector (trained in full or frozen) or the output head. Otherwise the names given."""
    if p["lora"]["target_modules"] != "auto":
        return p["lora"]["target_modules"]
    parts = [fam.LANGUAGE] + ([] if p["freeze_vision"] else [fam.VISION])
    head = model.get_output_embeddings()   # inside the language model in some families (InstructBLIP-Video)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name.startswith(part + ".") for part in parts)
            and not name.startswith(fam.PROJECTOR + ".") and module is not head]


def align_dtypes(model, fam) -> None:
    """Run the vision tower and projector in the dtype of the language model's embeddings, pixels included.

    A 4-bit base can leave these unquantized parts in another dtype than the text embeddings, while the processor
    hands over float32 pixels and SmolVLM casts pixels to the dtype of its first parameter: the forward pass then
    fails with "Input type (float) and bias type (c10::BFloat16) should be the same" or in the masked scatter
    that puts image features into the text sequence.
    """
    dtype = model.get_input_embeddings().weight.dtype
    vision = model.get_submodule(fam.VISION).to(dtype)
    model.get_submodule(fam.PROJECTOR).to(dtype)

    def convert(x):
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    def cast_pixels(_module, args, kwargs):
        return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}
    vision.register_forward_pre_hook(cast_pixels, with_kwargs=True)


def save(trainer, processor, out: Path, base_final: str, p: dict, fam) -> None:
    """full: out/model. lora/qlora: out/adapter (loading it loads `base_final` and applies the adapter), and with
    merge_lora the full-precision base with the adapter merged in, as out/model. Every process calls it (ZeRO-3
    gathers the weights across them); only the main process writes."""
    folder = out / ("model" if p["finetune"] == "full" else "adapter")
    save_model(trainer, folder)
    if not is_main_process():
        return
    processor.save_pretrained(folder)
    if p["finetune"] == "full":
        return
    config_path = out / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base_now, config["base_model_name_or_path"] = config["base_model_name_or_path"], base_final
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if p["merge_lora"]:   # merged into a full-precision copy of the base: merging into 4-bit weights would round
        merged = PeftModel.from_pretrained(vlm.load_model(fam, base_now), out / "adapter")
        merged.merge_and_unload().save_pretrained(out / "model")
        processor.save_pretrained(out / "model")

