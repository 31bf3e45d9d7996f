import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from stages.models import attention, vlm
from tests.helpers import TINY_VLM


def loop_attention(query, key, value, bounds):
    """What transformers' sdpa path does for these towers: one call per sequence."""
    return torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b])
                      for a, b in zip(bounds, bounds[1:])], dim=2).transpose(1, 2)


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 9, 16, 4, 9], [7]])
def test_varlen_sdpa_gives_the_per_sequence_loop_outputs_and_gradients(lengths):
    bounds = np.cumsum([0, *lengths]).tolist()
    torch.manual_seed(0)
    inputs = [torch.randn(1, 2, bounds[-1], 8, requires_grad=True) for _ in range(3)]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    ours, _ = attention.varlen_sdpa(None, *inputs, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
    theirs = loop_attention(*inputs, bounds)
    assert ours.shape == theirs.shape == (1, bounds[-1], 2, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), inputs)
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), inputs)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_varlen_sdpa_refuses_a_mask_or_other_key_bounds():
    q = torch.randn(1, 2, 8, 4)
    bounds = torch.tensor([0, 4, 8])
    with pytest.raises(ValueError, match="within the sequences of cu_seqlens only"):
        attention.varlen_sdpa(None, q, q, q, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool),
                              cu_seq_lens_q=bounds)
    with pytest.raises(ValueError, match="within the sequences of cu_seqlens only"):
        attention.varlen_sdpa(None, q, q, q, cu_seq_lens_q=bounds, cu_seq_lens_k=torch.tensor([0, 2, 8]))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_each_varlen_family_tower_matches_its_sdpa_loop_and_saves_without_it(name, tmp_path):
    """The tower as train_vlm loads it (varlen) against the same weights on transformers' sdpa loop: two videos of
    different frame sizes and counts, so that the sequences differ in length; then the saved model loads plain."""
    fam = vlm.family(name)
    base = fam.build_tiny({**TINY_VLM, "vision_layers": 2}, ["a red circle moves left"] * 50, 32, tmp_path / "base")
    model = vlm.load_model(fam, str(base))
    assert model.config.vision_config._attn_implementation == attention.VARLEN_SDPA
    assert model.config.text_config._attn_implementation == "sdpa"
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), rng.integers(0, 255, (2, 48, 64, 3), np.uint8)]
    processor = AutoProcessor.from_pretrained(base)
    inputs = processor.video_processor(videos=videos, size={"shortest_edge": 16, "longest_edge": 64 * 64},
                                       return_tensors="pt")
    tower = model.get_submodule(fam.VISION)

    def features_and_grads():
        tower.zero_grad()
        out = tower(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        out = out[0] if isinstance(out, tuple) else out
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    ours, ours_grads = features_and_grads()
    model.set_attn_implementation({"vision_config": "sdpa"})
    theirs, theirs_grads = features_and_grads()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert len(ours_grads) == len(theirs_grads) > 0
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    model.save_pretrained(tmp_path / "saved")
    plain = fam.MODEL_CLASS.from_pretrained(tmp_path / "saved")
    assert plain.config.vision_config._attn_implementation == "sdpa"
