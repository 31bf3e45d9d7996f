"""What the trainers share: trainer (TrainingArguments from params, checkpoints, dvclive callbacks),
distributed (launchers, DeepSpeed config, process groups), finetune (full / LoRA / QLoRA)."""
