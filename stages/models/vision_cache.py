"""The vision-feature cache (train_vlm.cache_vision): what a frozen vision tower computes for each frame, computed once
by the `embed` stage and read back by train_vlm instead of running the tower again at every step.

With `train_vlm.freeze_vision`, the tower's output for a frame is the same at every step, epoch and experiment that
keeps the frames, the processor settings and the tower's weights. The cache stores it per frame, before the projector
(which trains), keyed by the sha256 of the frame's pixel tensor as the processor hands it to the tower: the frames and
the processor settings are both in that key. The features go into packs (safetensors files of many frames) beside an
index that names the digest of the tower's weights; `attach` refuses a cache written for other weights.

The seam is the tower module's `forward`, replaced on the instance: the module itself stays, so its weights are
trained, checkpointed, saved and exported exactly as without the cache. `record` runs the model up to its tower and
stops there; `attach` makes the tower answer from the cache (a frame it does not hold runs the real tower, and is
counted). What the model reads from its tower is what is stored: `last_hidden_state`, and the hidden states its config
names as `vision_feature_layer` where they differ from it. Where the projector is the tower's own last module
(Qwen2-VL's visual.merger), the features before it are stored and the projector runs on them. A family whose tower
the cache cannot stand for says why, as CANNOT_CACHE in its module.
"""
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

INDEX = "index.json"          # {"enabled": false, "reason": ...} where the cache is off (embed writes that one)
PACK_BYTES = 1 << 30          # features per pack file: few files for DVC to hash, none too big to move


class _Stop(Exception):
    """Raised by the recording tower once it has its output: the rest of the model's forward is not needed."""


def check(fam, p: dict) -> None:
    """Stop before any work where train_vlm.cache_vision cannot apply: a tower that trains, or a family whose tower
    is not separable from what trains (its module says why)."""
    name = fam.__name__.rsplit(".", 1)[-1]
    if not p["freeze_vision"]:
        raise ValueError("train_vlm.cache_vision needs train_vlm.freeze_vision: true (a tower that trains computes "
                         "new features at every step)")
    if p["deepspeed"]["enabled"] and p["deepspeed"]["zero_stage"] == 3:
        raise ValueError("train_vlm.cache_vision: ZeRO-3 partitions the tower's weights across processes, so no "
                         "process can check them against the cache; use zero_stage 2 or less")
    reason = getattr(fam, "CANNOT_CACHE", None)
    if reason:
        raise ValueError(f"train_vlm.cache_vision: {name} cannot cache its vision features: {reason}; set "
                         f"train_vlm.cache_vision: false")


def tower(model, fam) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_submodule(fam.VISION)


def _head(fam) -> str | None:
    """The projector where it is the tower's own submodule (Qwen2-VL's visual.merger), by its name inside the tower:
    it trains, so it is not cached; it runs on the cached features."""
    inside = fam.PROJECTOR.startswith(fam.VISION + ".")
    return fam.PROJECTOR.removeprefix(fam.VISION + ".") if inside else None


def _frozen(module: torch.nn.Module, fam) -> dict[str, torch.Tensor]:
    """The tower's weights that the cache stands for: all but its head's."""
    head = _head(fam)
    return {name: tensor for name, tensor in module.state_dict().items()
            if head is None or not name.startswith(head + ".")}


def digest(module: torch.nn.Module, fam) -> str:
    """sha256 of the frozen tower's weights: every tensor's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    for name, tensor in _frozen(module, fam).items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def frame_spans(args: tuple, kwargs: dict) -> list[tuple[int, int, str]]:
    """Where each frame is in the tower's input, and its key: (first row, end row, sha256 of its shape, dtype and
    bytes). A row of dim 0 is a frame, except where the tower takes `grid_thw` (Qwen's flat patches): there a frame
    (a temporal patch, two video frames) is h x w rows, and (h, w) goes into its key."""
    pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
    rows = pixels.detach().cpu().contiguous()
    grid = kwargs.get("grid_thw")
    spans = ([((h, w), h * w) for t, h, w in grid.tolist() for _ in range(t)] if grid is not None
             else [(tuple(rows.shape[1:]), 1)] * len(rows))
    found, start = [], 0
    for shape, size in spans:
        h = hashlib.sha256(f"{shape}{rows.dtype}".encode())
        h.update(memoryview(rows[start:start + size].reshape(-1).view(torch.uint8).numpy()))
        found.append((start, start + size, h.hexdigest()))
        start += size
    return found


def _layers_read(model, count: int) -> list[int]:
    """Indices into the tower's `count` hidden states that the model reads: its config's vision_feature_layer."""
    layer = getattr(model.config, "vision_feature_layer", -1)
    return sorted({index % count for index in (layer if isinstance(layer, (list, tuple)) else [layer])})


def record(model, fam, batches: Iterable[dict]) -> Iterator[tuple[str, dict[str, torch.Tensor], int | None]]:
    """Run `model` on each batch (collated model inputs) up to its vision tower, and yield each frame's key, the
    tensors the model may read from the tower ("last", and "layer<i>" for each hidden state i its config reads where
    that differs from the last), and how many hidden states the tower returns (None when the model asks for none)."""
    module, shown = tower(model, fam), []

    def recording(*args, **kwargs):
        out = type(module).forward(module, *args, **kwargs)
        parts, count = {"last": out.last_hidden_state}, None
        if kwargs.get("output_hidden_states") and out.hidden_states is not None:
            count = len(out.hidden_states)
            for i in _layers_read(model, count):   # stored apart only where it differs (CLIP's last layer does not)
                if not torch.equal(out.hidden_states[i], out.last_hidden_state):
                    parts[f"layer{i}"] = out.hidden_states[i]
        for start, end, key in frame_spans(args, kwargs):
            shown.append((key, {name: tensor[start:end].detach().cpu().clone() for name, tensor in parts.items()},
                          count))
        raise _Stop

    module.forward = recording
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch)
                except _Stop:
                    pass
                yield from shown
                shown.clear()
    finally:
        del module.forward


def write(folder: Path, recorded: Iterable[tuple[str, dict[str, torch.Tensor], int | None]], **index) -> dict:
    """Write what `record` yields (each frame once) in packs of about PACK_BYTES as it comes, and the index (with
    `index`'s fields) that names them."""
    folder.mkdir(parents=True, exist_ok=True)
    packs, pack, seen, total, packed, hidden_states = [], {}, set(), 0, 0, None

    def flush():
        packs.append(f"pack-{len(packs):05d}.safetensors")
        save_file(pack, folder / packs[-1])
        pack.clear()

    for key, parts, count in recorded:
        hidden_states = count   # the same for every frame of a tower
        if key in seen:
            continue
        seen.add(key)
        for name, tensor in parts.items():
            pack[f"{key}.{name}"] = tensor.contiguous()
            total += tensor.nbytes
        if total - packed >= PACK_BYTES:
            flush()
            packed = total
    if pack:
        flush()
    index = {**index, "enabled": True, "frames": len(seen), "bytes": total, "hidden_states": hidden_states,
             "packs": packs}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


class VisionCache:
    """The packs of a cache folder, read lazily (memory-mapped); counts the frames it answered and missed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text())
        if not self.index["enabled"]:
            raise ValueError(f"{self.folder}: the cache is empty ({self.index['reason']}); run `dvc repro embed` with "
                             f"train_vlm.cache_vision: true")
        self.where, self.hits, self.misses = {}, 0, 0
        for pack in self.index["packs"]:
            handle = safe_open(self.folder / pack, framework="pt")
            self.where.update(dict.fromkeys(handle.keys(), handle))

    def get(self, keys: list[str], names: list[str]) -> dict[str, torch.Tensor] | None:
        """The tensors `names` of frames `keys`, concatenated, or None unless the cache holds every one of them."""
        if not all(f"{key}.{name}" in self.where for key in keys for name in names):
            return None
        return {name: torch.cat([self.where[f"{key}.{name}"].get_tensor(f"{key}.{name}") for key in keys])
                for name in names}

    def summary(self) -> dict:
        return {"frames_from_cache": self.hits, "frames_through_tower": self.misses}


def attach(model, fam, cache: VisionCache) -> None:
    """Make the model's vision tower answer from `cache`: per call, the features of every frame it is shown, or the
    real tower's output when the cache lacks any of them. Refuses a cache written for other tower weights."""
    module, head = tower(model, fam), _head(fam)
    if any(weight.requires_grad for name, weight in module.named_parameters()
           if head is None or not name.startswith(head + ".")):
        raise ValueError("train_vlm.cache_vision: the vision tower has weights that train (lora.target_modules names "
                         "modules inside it), so its features change at every step; name language-model modules only")
    found = digest(module, fam)
    if found != cache.index["tower"]:
        raise ValueError(f"{cache.folder} holds the features of another vision tower (weights "
                         f"{cache.index['tower'][:12]}, this model's are {found[:12]}): rerun `dvc repro embed` for "
                         f"this model")
    real = type(module).forward
    count = cache.index["hidden_states"]

    def cached(*args, **kwargs):
        keys = [key for _, _, key in frame_spans(args, kwargs)]
        layers = _layers_read(model, count) if kwargs.get("output_hidden_states") and count else []
        apart = [f"layer{i}" for i in layers if f"{keys[0]}.layer{i}" in cache.where]
        parts = cache.get(keys, ["last"] + apart)
        if parts is None:
            cache.misses += len(keys)
            return real(module, *args, **kwargs)
        cache.hits += len(keys)
        device = next(module.parameters()).device
        parts = {name: tensor.to(device) for name, tensor in parts.items()}
        # the hidden states the model reads; the others are None here, and would fail loudly if read
        hidden = tuple(parts.get(f"layer{i}", parts["last"]) if i in layers else None
                       for i in range(count)) if layers else None
        pooled = module.get_submodule(head)(parts["last"]) if head else None   # the head trains: it runs here
        return BaseModelOutputWithPooling(last_hidden_state=parts["last"], hidden_states=hidden, pooler_output=pooled)

    module.forward = cached
