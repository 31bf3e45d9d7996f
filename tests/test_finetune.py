import pytest
import torch
from transformers import AutoProcessor

from stages.common.files import read_jsonl
from stages.models import vlm
from stages.training import finetune
from tests.helpers import TINY_VLM, frames, row_with

FINETUNE = {"finetune": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "auto"},
            "freeze_vision": False, "train_projector": True, "merge_lora": False, "gradient_checkpointing": False,
            "attn_implementation": "sdpa", "bf16": "auto"}


@pytest.fixture(scope="module", params=list(vlm.FAMILIES))
def tiny_base(request, small_data, tmp_path_factory):
    fam = vlm.family(request.param)
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]]
    return fam, str(fam.build_tiny(TINY_VLM, texts, 32, tmp_path_factory.mktemp(request.param) / "base"))


def trainable(model) -> set[str]:
    return {name for name, weight in model.named_parameters() if weight.requires_grad}


def test_lora_trains_adapters_on_every_linear_layer_of_vision_and_language_and_the_whole_projector(tiny_base):
    fam, base = tiny_base
    model = finetune.prepare(finetune.load(fam, base, FINETUNE), fam, FINETUNE)
    names = trainable(model)
    adapters = {name for name in names if ".lora_" in name}
    projector = {name for name in names if ".lora_" not in name}
    assert all("modules_to_save" in name and fam.PROJECTOR in name for name in projector) and projector
    assert any(fam.VISION + "." in name for name in adapters) and any(fam.LANGUAGE + "." in name for name in adapters)
    assert not any(fam.PROJECTOR + "." in name or "lm_head" in name for name in adapters)
    linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                 if (fam.LANGUAGE + "." in n or fam.VISION + "." in n) and fam.PROJECTOR + "." not in n
                 and ".lora_" not in n and "modules_to_save" not in n and "original_module" not in n
                 and "lm_head" not in n)          # the output head, inside the language model in InstructBLIP-Video
    assert len(adapters) == 2 * linear                        # lora_A and lora_B on each


def test_lora_with_a_frozen_vision_tower_adapts_the_language_model_only(tiny_base):
    fam, base = tiny_base
    p = {**FINETUNE, "freeze_vision": True, "train_projector": False, "lora": {**FINETUNE["lora"],
                                                                             "target_modules": "auto"}}
    names = trainable(finetune.prepare(finetune.load(fam, base, p), fam, p))
    assert names and all(".lora_" in name and fam.LANGUAGE + "." in name for name in names)


def test_lora_takes_named_target_modules(tiny_base):
    fam, base = tiny_base
    p = {**FINETUNE, "train_projector": False, "lora": {**FINETUNE["lora"], "target_modules": ["v_proj"]}}
    names = trainable(finetune.prepare(finetune.load(fam, base, p), fam, p))
    assert names and all("v_proj.lora_" in name for name in names)


def test_full_finetune_switches_freeze_the_vision_tower_and_the_projector(tiny_base):
    fam, base = tiny_base
    p = {**FINETUNE, "finetune": "full", "freeze_vision": True, "train_projector": False}
    model = finetune.prepare(finetune.load(fam, base, p), fam, p)
    names = trainable(model)
    assert names and not any(name.startswith(fam.VISION + ".") for name in names)
    assert any(name.startswith(fam.LANGUAGE + ".") for name in names)
    p["train_projector"] = True
    names = trainable(finetune.prepare(finetune.load(fam, base, p), fam, p))
    assert any(name.startswith(fam.PROJECTOR + ".") for name in names)


def test_attention_implementation_comes_from_params(tiny_base):
    fam, base = tiny_base
    model = finetune.load(fam, base, {**FINETUNE, "attn_implementation": "eager"})
    assert model.config._attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; a CUDA machine loads 4-bit instead")
def test_qlora_on_a_machine_without_cuda_stops_with_a_clear_message(tiny_base):
    fam, base = tiny_base
    with pytest.raises(SystemExit, match="qlora .* needs a CUDA GPU.*Use finetune: lora"):
        finetune.load(fam, base, {**FINETUNE, "finetune": "qlora"})


def test_vision_parts_and_pixels_are_aligned_to_the_text_dtype_as_a_4_bit_base_needs(small_data, tmp_path):
    """A 4-bit SmolVLM keeps its vision tower and connector in bf16 while pixels arrive in float32: reproduced here
    by casting those two parts to bf16 (bitsandbytes itself needs CUDA)."""
    fam = vlm.family("smolvlm")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in read_jsonl(small_data / "data/manifest/train.jsonl")
             for m in row["messages"]]
    base = fam.build_tiny(TINY_VLM, texts, 32, tmp_path / "base")
    processor = AutoProcessor.from_pretrained(base)
    example = vlm.encode(row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")]), frames(),
                         processor, fam, 4096)
    batch = vlm.collate([example], processor.tokenizer.pad_token_id)

    def mixed_precision_model():
        model = fam.MODEL_CLASS.from_pretrained(base)
        model.get_submodule(fam.VISION).to(torch.bfloat16)
        model.get_submodule(fam.PROJECTOR).to(torch.bfloat16)
        model.get_submodule(fam.LANGUAGE).embed_tokens.to(torch.float32)
        return model

    with pytest.raises(RuntimeError, match="dtype|type"):
        mixed_precision_model()(**batch)
    model = mixed_precision_model()
    finetune.align_dtypes(model, fam)
    assert torch.isfinite(model(**batch).loss)
    assert {w.dtype for w in model.get_submodule(fam.VISION).parameters()} == {torch.float32}


def test_lora_merged_into_the_base_gives_the_adapters_outputs_from_a_plain_checkpoint(tiny_base, tmp_path):
    """What finetune.save does with merge_lora: the merged model, saved and loaded back with the family's class
    alone, computes what the base with the adapter does."""
    fam, base = tiny_base
    processor = AutoProcessor.from_pretrained(base)
    model = finetune.prepare(finetune.load(fam, base, FINETUNE), fam, FINETUNE).eval()
    torch.manual_seed(0)
    for name, weight in model.named_parameters():   # a trained adapter: lora_B starts at zero, which merges to nothing
        if ".lora_B." in name:
            torch.nn.init.normal_(weight, std=0.5)
    batch = vlm.collate([vlm.encode(row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")]),
                                    frames(), processor, fam, 4096)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        adapted = model(**batch).logits
        model.merge_and_unload().save_pretrained(tmp_path / "merged")
        merged = vlm.load_model(fam, str(tmp_path / "merged")).eval()(**batch).logits
        plain = fam.MODEL_CLASS.from_pretrained(base).eval()(**batch).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert not torch.allclose(plain, merged, atol=1e-3)
