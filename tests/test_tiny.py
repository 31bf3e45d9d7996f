from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages.models import tiny

TEXTS = ["a red circle moves left", "a blue square moves up", "Describe the video. | tags: red, circle, left"] * 5
PARAMS = {"d_model": 32, "layers": 1, "heads": 2, "ffn_dim": 64, "vocab_size": 300}


def test_tokenizer_round_trips_text_it_never_saw():
    tokenizer = tiny.train_tokenizer(TEXTS, 300)
    text = "Ünïcode & emoji 🎥, spaces  kept"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    specials = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert specials == [0, 1, 2, 3]


def test_seq2seq_is_saved_and_loaded_by_path_like_a_hub_id(tmp_path):
    path = tiny.build_seq2seq(PARAMS, TEXTS, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    assert model.config.model_type == "m2m_100" and model.config.d_model == 32
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id                 # seq2seq sources end with </s>
    output = model.generate(**tokenizer(["a red circle"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert output.shape[0] == 1 and 1 < output.shape[1] <= 5
