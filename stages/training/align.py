"""How trl's DPOTrainer and GRPOTrainer see our videos (stages/align_vlm.py).

trl's vision path takes images. Ours are videos whose frames `extract` decoded once, and each family turns them into
its own processor inputs (stages/models/vlm), so trl is adapted at the narrowest seam each trainer has:
- DPO, the collator: `PairCollator` encodes a pair's chosen and its rejected conversation with `vlm.encode`, the very
  encoding SFT trains on (media tokens expanded by the family's processor), and marks the last answer as the
  completion. trl's loss reads input_ids, attention_mask and completion_mask and hands every other key (the media) to
  the model: its log-probs, reference model and loss are trl's own.
- GRPO, the prompt tokenisation and the log-prob forward: `VideoGRPOTrainer` tokenises each prompt with its videos
  (the prompt `evaluate` builds), keeps each sample's media beside it in the batch, where trl's shuffles and splits
  carry it, and gives them to the model wherever trl computes log-probs. Sampling, rewards, the group-normalised
  advantages, the KL term and the loss are trl's own.
"""
import warnings

import torch
from datasets import Dataset
from trl import DPOTrainer, GRPOTrainer

from stages.data.frames import FRAMES, load_frames
from stages.models import vlm
from stages.training.schedule import ScoredEvaluation

# trl 1.16 reads transformers' deprecated `model.is_gradient_checkpointing` around every reference and generation
# pass: a deprecation between the two libraries that says nothing about the run, dropped for that attribute only
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# config keys of the tokens that stand for media: a sampled answer must not contain one (the log-prob forward would
# count it as a video or image of its own and find no features for it)
MEDIA_TOKENS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index", "vision_start_token_id",
                "vision_end_token_id")


def media_token_ids(config) -> list[int]:
    return sorted({getattr(config, key) for key in MEDIA_TOKENS if getattr(config, key, None) is not None})


def row_dataset(rows: list[dict], start: int = 0) -> Dataset:
    """The rows as trl's trainers take them: a datasets.Dataset of row positions, from `start` (the collator, the
    GRPO prompts and the rewards look the rows up in one list of every split's rows), with the row id as the text
    prompt that trl logs beside a completion."""
    return Dataset.from_dict({"index": list(range(start, start + len(rows))), "prompt": [row["id"] for row in rows]})


def with_answer(row: dict, answer: str) -> dict:
    """The row with `answer` in place of its last assistant turn."""
    last = max(i for i, message in enumerate(row["messages"]) if message["role"] == "assistant")
    messages = [dict(m, content=answer) if i == last else m for i, m in enumerate(row["messages"])]
    return {**row, "messages": messages}


def pair(row: dict) -> tuple[dict, dict]:
    """A preference row as its chosen conversation (the row as it is) and its rejected one."""
    return row, with_answer(row, row["rejected"])


def last_answer(labels: torch.Tensor) -> torch.Tensor:
    """1 on the last labelled span (the final assistant answer with its end-of-turn token), 0 elsewhere."""
    labelled = (labels != vlm.IGNORE).int()
    end = len(labels) - int(labelled.flip(0).argmax())
    start = end
    while start > 0 and labelled[start - 1]:
        start -= 1
    mask = torch.zeros_like(labelled)
    mask[start:end] = 1
    return mask


class PairCollator:
    """DPO batches from preference rows: the chosen conversations first, then the rejected ones (trl's layout), each
    encoded as SFT encodes it; `completion_mask` marks the final answer, the only tokens that differ."""

    def __init__(self, rows: list[dict], processor, fam, max_length: int, frames_dir=FRAMES):
        self.rows, self.processor, self.fam = rows, processor, fam
        self.max_length, self.frames_dir = max_length, frames_dir

    def __call__(self, examples: list[dict]) -> dict:
        rows = [self.rows[example["index"]] for example in examples]
        videos = [load_frames(row, self.frames_dir) for row in rows]
        sides = zip(*(pair(row) for row in rows))   # (chosen rows), (rejected rows)
        encoded = [vlm.encode(side_row, frames, self.processor, self.fam, self.max_length)
                   for side in sides for side_row, frames in zip(side, videos)]
        completion = [last_answer(example.pop("labels")) for example in encoded]
        batch = vlm.collate(encoded, pad_token_id=self.processor.tokenizer.pad_token_id)
        batch["completion_mask"] = torch.nn.utils.rnn.pad_sequence(completion, batch_first=True, padding_value=0)
        return batch


class VideoDPOTrainer(ScoredEvaluation, DPOTrainer):
    """trl's DPOTrainer on our pairs: the dataset is row positions, which `PairCollator` encodes on the fly, so trl's
    own tokenisation of prompt/chosen/rejected text is skipped."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class VideoGRPOTrainer(ScoredEvaluation, GRPOTrainer):
    """trl's GRPOTrainer on video prompts (see the module docstring for the seam)."""

    def __init__(self, *args, prompt_rows: list[dict], fam, frames_dir=FRAMES, **kwargs):
        self.prompt_rows, self.fam, self.frames_dir = prompt_rows, fam, frames_dir
        self.media = []   # per sample of the batch being scored or trained on: its media tensors and prompt length
        super().__init__(*args, **kwargs)

    def prompt_media(self, row: dict) -> dict:
        """One sample's prompt ids and media, as the processor gives them for the prompt evaluate builds."""
        inputs = vlm.generation_inputs([row], self.processing_class, self.fam, self.frames_dir)
        return {key: value[0] if key in vlm.SEQUENCE_KEYS else value for key, value in inputs.items()}

    def _generate_and_score_completions(self, inputs):
        # trl repeats each prompt num_generations times in a batch: each row is read and processed once
        media = {index: self.prompt_media(self.prompt_rows[index]) for index in {x["index"] for x in inputs}}
        self.media = [media[x["index"]] for x in inputs]
        output = super()._generate_and_score_completions(inputs)
        output["media"] = self.media   # a list: trl's shuffle and split keep it with its samples
        return output

    def _tokenize_prompts(self, prompts):
        ids = [sample["input_ids"].tolist() for sample in self.media]
        fields = self._media_fields(self.media)
        if "mm_token_type_ids" in self.media[0]:   # per-token: trl left-pads a list of lists
            fields["mm_token_type_ids"] = [sample["mm_token_type_ids"].tolist() for sample in self.media]
        return ids, None, fields

    @staticmethod
    def _media_fields(media: list[dict]) -> dict:
        """The media tensors of several samples, batched as `vlm.collate` batches them."""
        tensors = [{key: value for key, value in sample.items() if key not in vlm.SEQUENCE_KEYS} for sample in media]
        return vlm.collate(tensors, pad_token_id=0)

    def _compute_loss(self, model, inputs):
        self.media = inputs["media"]
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_image_inputs):
        """trl's log-prob forward with each chunk's video media (`self.media` holds the samples of `input_ids`, in
        order); trl's image arguments are empty here."""
        batch_size = batch_size or input_ids.size(0)
        prompt_length = input_ids.size(1) - logits_to_keep
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            chunk = slice(start, min(start + batch_size, input_ids.size(0)))
            media = self.media[chunk]
            inputs = {"input_ids": input_ids[chunk], "attention_mask": attention_mask[chunk],
                      **{key: value.to(input_ids.device) for key, value in self._media_fields(media).items()}}
            if "mm_token_type_ids" in media[0]:   # the prompt's, left-padded as its ids are; 0 over the completion
                types = torch.zeros_like(inputs["input_ids"])
                for row, sample in enumerate(media):
                    own = sample["mm_token_type_ids"].to(types.device)
                    types[row, prompt_length - len(own):prompt_length] = own
                inputs["mm_token_type_ids"] = types
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                outputs = model(**inputs, labels=labels, fused_lm_head=True)
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None
