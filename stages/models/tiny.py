"""Tiny models for the offline embedded default: a BPE tokenizer trained on our own text, and an NLLB-architecture
(M2M100) seq2seq model with random weights.

They are saved with `save_pretrained`, and training loads them back by path, exactly the way a hub id is loaded:
the embedded default exercises the same code as a real checkpoint does.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import M2M100Config, M2M100ForConditionalGeneration, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]   # ids 0..3 in this order


def train_tokenizer(texts, vocab_size: int, extra_special: list[str] = (), append_eos: bool = False,
                    **named_tokens) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (lossless round trip, no unknown bytes), wrapped as a transformers tokenizer.

    `named_tokens` sets the tokenizer's role tokens (eos_token=..., image_token=...); by default eos is `</s>`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + list(extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    if append_eos:  # seq2seq convention: every encoded sequence ends with </s>
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    roles = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    special_roles = {k: v for k, v in named_tokens.items() if k not in roles}
    roles.update({k: v for k, v in named_tokens.items() if k in roles})
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=special_roles, **roles)


def build_seq2seq(p: dict, texts, out: Path) -> Path:
    """Save a random-init M2M100 (NLLB architecture) and its tokenizer to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], append_eos=True)
    config = M2M100Config(
        vocab_size=len(tokenizer), d_model=p["d_model"], encoder_layers=p["layers"], decoder_layers=p["layers"],
        encoder_attention_heads=p["heads"], decoder_attention_heads=p["heads"], encoder_ffn_dim=p["ffn_dim"],
        decoder_ffn_dim=p["ffn_dim"], max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    model = M2M100ForConditionalGeneration(config)
    model.generation_config.forced_bos_token_id = None  # NLLB forces a language code; our tokenizer has none
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_tiny(model, processor, out: Path) -> Path:
    """Save a tiny vision-language model and its processor to `out`, generation ending at the end-of-turn token."""
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
