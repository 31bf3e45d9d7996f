"""Variable-length attention on PyTorch's SDPA, for the vision towers that run many independent sequences as one.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL (and GLM-4V and others built the same way) put every frame pair of every video of a
batch into one tensor and attend within each frame pair (or, in Qwen2.5-VL's window layers, each window) by its
`cu_seqlens`. Under `sdpa` transformers runs one attention call per sequence, a Python loop of hundreds of small calls
a layer (a batch of 8 samples with 1-8 videos each: 208 a layer). Only a flash-attention implementation receives the
`cu_seqlens` themselves; `varlen_sdpa` is one, built on SDPA: the sequences of each length go through one batched
call. The same arithmetic as the loop (a test compares outputs and gradients), on any device, without the flash-attn
package.

transformers passes `cu_seqlens` to an implementation whose name contains "flash" (`is_flash_attention_requested`),
hence the name. `use_for_vision` sets it on a loaded model's vision tower only; the language model keeps its own.
The implementation is not saved with the model: a checkpoint or an export loads with transformers' defaults.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VARLEN_SDPA = "flash_varlen_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=False,
                cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """Attention within each sequence of a packed [1, heads, tokens, dim] query, key and value, the sequences
    bounded by `cu_seq_lens_q` (as flash-attention's varlen kernels take them). Returns ([1, tokens, heads, dim],
    None), what transformers' attention functions return."""
    if attention_mask is not None or cu_seq_lens_q is None or (
            cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError(f"{VARLEN_SDPA}: takes self-attention within the sequences of cu_seqlens only (no mask)")
    bounds = cu_seq_lens_q.tolist()
    starts_by_length = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    heads, tokens = query.shape[1], bounds[-1]
    in_order = len(starts_by_length) == 1
    outputs, positions = [], []
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts, device=query.device)[:, None]
                 + torch.arange(length, device=query.device)).reshape(-1)

        # [1, heads, tokens, dim] -> [sequences, heads, length, dim]
        q, k, v = ((states[0, :, :tokens] if in_order else states[0].index_select(1, index))
                   .unflatten(1, (len(starts), length)).transpose(0, 1) for states in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                             scale=scaling, is_causal=is_causal,
                                             enable_gqa=key.shape[1] != heads)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, out.shape[-1]))   # [sequences x length, heads, dim]
        positions.append(index)
    if in_order:
        return outputs[0].unsqueeze(0), None
    order = torch.cat(positions)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(outputs).index_select(0, inverse).unsqueeze(0), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)


def use_for_vision(model) -> None:
    """Run the vision tower of `model` (one whose sub-config `vision_config` splits by cu_seqlens) on `varlen_sdpa`
    where it would run on SDPA; flash-attention and eager stay as asked."""
    if model.config.vision_config._attn_implementation == "sdpa":
        model.set_attn_implementation({"vision_config": VARLEN_SDPA})
