"""Model builders: tiny (offline tokenizer and tiny seq2seq), vlm/ (one module per vision-language family)."""
