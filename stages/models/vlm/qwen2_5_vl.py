"""Qwen2.5-VL family: what Qwen2-VL does (native video input, fps passed along, which Qwen2.5-VL turns into absolute
time positions), with its windowed-attention vision tower. Only the classes and the vision config differ."""
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from stages.models.vlm import qwen2_vl
from stages.models.vlm.qwen2_vl import LANGUAGE, MERGE, PROJECTOR, TEMPORAL, VISION, media_inputs, user_content  # noqa: F401 (family API)

MODEL_CLASS = Qwen2_5_VLForConditionalGeneration
VARLEN_VISION = True    # its vision tower attends by cu_seqlens, as Qwen2-VL's
CANNOT_CACHE = ("its tower hands its projector (model.visual.merger, which trains) each frame's patches in "
                "attention-window order, inside its own forward; the cache keeps frames in their own order and "
                "does not reorder them yet")


def vision_config(p: dict) -> dict:
    return dict(depth=p["vision_layers"], hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                out_hidden_size=p["text_hidden"], num_heads=p["heads"], patch_size=p["patch_size"],
                spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=2 * MERGE * p["patch_size"],
                fullatt_block_indexes=[p["vision_layers"] - 1])


def build_tiny(p: dict, texts, frame_size: int, out):
    return qwen2_vl.build_tiny(p, texts, frame_size, out, model_class=MODEL_CLASS, config_class=Qwen2_5_VLConfig,
                               processor_class=Qwen2_5_VLProcessor, vision=vision_config(p))
