"""Greedy answers of a loaded model to manifest rows: one decoding for `evaluate` and for the trainers' checkpoint
selection (stages/training/schedule.py), so that a model is selected by the answers it will be scored on."""
from collections.abc import Callable

import torch


@torch.inference_mode()
def greedy_answers(model, decoder, prompts: Callable[[list[dict]], dict], rows: list[dict], batch_size: int,
                   max_new_tokens: int) -> list[str]:
    """The model's answer to each row, in batches: `prompts(batch)` gives the model's inputs for a batch of rows
    (the seq2seq source text, or the VLM's conversation and frames), `decoder` (tokenizer or processor) decodes.
    A decoder-only model's output begins with its prompt, which is cut off."""
    answers = []
    for start in range(0, len(rows), batch_size):
        inputs = prompts(rows[start:start + batch_size]).to(model.device)
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        if not model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1]:]
        answers += decoder.batch_decode(output, skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def source_prompts(tokenizer, rows: list[dict]):
    """A seq2seq model's inputs for a batch of rows: their source texts (metadata and question)."""
    return tokenizer([row["source"] for row in rows], padding=True, return_tensors="pt")
