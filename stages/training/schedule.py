"""The schedule every trainer shares, from the keys of its params block: how long it trains (`epochs` or `max_steps`),
its warm-up (`warmup_ratio` or `warmup_steps`), when it evaluates (`eval_every` steps or `epoch`), which weights it
keeps (`keep: last | best` by `best_metric`), and when it stops early (`early_stopping_patience`).

This is the one place where those keys take effect:
- `check` stops a stage before any work on a schedule that cannot run;
- `arguments` turns the keys into TrainingArguments, `callbacks` adds early stopping;
- `ScoredTrainer` / `ScoredSeq2SeqTrainer` add a generation metric to each evaluation;
- `selection` says which step was kept and why, for training.json and the plots.

The machinery is transformers' own (metric_for_best_model, load_best_model_at_end, EarlyStoppingCallback): its
checkpoint rotation never deletes the best checkpoint, and trainer_state.json carries the best step and score, and
the early-stopping count, across a kill and a resume.
"""
from collections.abc import Callable

from transformers import EarlyStoppingCallback, PreTrainedModel, Seq2SeqTrainer, Trainer

from stages.results import metrics

LOSS = "loss"   # the validation loss every evaluation computes; the other metrics score greedy answers

# `Answer(model, rows)`: the model's greedy answers to `rows` (stages/results/answers.py)
Answer = Callable[[object, list[dict]], list[str]]


def check(stage: str, p: dict, val_rows: list[dict]) -> None:
    """Stop before any work when the length, the warm-up or the selection metric is ill-defined, naming the keys."""
    if bool(p["epochs"]) == bool(p["max_steps"]):
        raise SystemExit(f"{stage}: set exactly one of {stage}.epochs and {stage}.max_steps (the other to 0)")
    if p["warmup_ratio"] and p["warmup_steps"]:
        raise SystemExit(f"{stage}: set at most one of {stage}.warmup_ratio and {stage}.warmup_steps (the other to 0)")
    computed = [LOSS, *metrics.metric_names(scored_rows(p, val_rows))]
    if p["best_metric"] not in computed:
        raise SystemExit(f"{stage}.best_metric: {stage} does not compute {p['best_metric']!r} on this data; "
                         f"it computes {', '.join(computed)}")


def greater_is_better(p: dict) -> bool:
    """`auto`: lower is better for the loss, higher for every generation metric."""
    return p["best_metric"] != LOSS if p["greater_is_better"] == "auto" else p["greater_is_better"]


def arguments(p: dict) -> dict:
    """TrainingArguments keys for the schedule. Under `keep: best` a checkpoint is saved at every evaluation (the
    Trainer reloads the best one from disk at the end), otherwise every `save_steps` for a resume."""
    by_epoch = p["eval_every"] == "epoch"
    evaluation = {"eval_strategy": "epoch"} if by_epoch else {"eval_strategy": "steps", "eval_steps": p["eval_every"]}
    if p["keep"] == "best":
        saving = {"save_strategy": evaluation["eval_strategy"], "save_steps": evaluation.get("eval_steps", 1)}
    else:
        saving = {"save_strategy": "steps" if p["save_steps"] else "no", "save_steps": max(1, p["save_steps"])}
    return {
        **evaluation, **saving,
        # epochs: -1 steps tells the Trainer to count them from the epochs and the data
        "max_steps": p["max_steps"] or -1, "num_train_epochs": p["epochs"] or 1,
        # a ratio under 1 (the Trainer's own convention), else a count of steps
        "warmup_steps": p["warmup_steps"] or p["warmup_ratio"],
        # ~30 points on the loss curve: a ratio of the total steps, which epochs leave to the Trainer to count
        "logging_steps": max(1, p["max_steps"] // 30) if p["max_steps"] else 1 / 30,
        "metric_for_best_model": p["best_metric"], "greater_is_better": greater_is_better(p),
        "load_best_model_at_end": p["keep"] == "best",
        "save_total_limit": 1,   # the latest checkpoint, and the best one, which rotation never deletes
        "restore_callback_states_from_checkpoint": True,   # the early-stopping count survives a resume
    }


def callbacks(p: dict) -> list:
    patience = p["early_stopping_patience"]
    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []


def scored_rows(p: dict, val_rows: list[dict]) -> list[dict]:
    """The val rows a generation metric is scored on: the first `best_samples`, which bounds its cost."""
    return val_rows[:p["best_samples"]]


class ScoredEvaluation:
    """Mixin for a transformers Trainer: each evaluation also scores `answer`'s greedy answers to `rows` by
    `metric` when that is a generation metric. The score joins eval_loss in the evaluation's metrics, so the
    Trainer's best-model tracking, early stopping and logging (dvclive: eval/<metric>) all see it.

    It also loads checkpoints back correctly, for `keep: best` and for a resume (`_load_weights`)."""

    def __init__(self, *args, metric: str = LOSS, answer: Answer | None = None, rows: list[dict] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.metric, self.answer, self.rows = metric, answer, rows

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.metric != LOSS:
            answers = self.answer(self.model, self.rows)
            output.metrics[f"{metric_key_prefix}_{self.metric}"] = metrics.score(self.metric, answers, self.rows)
        return output

    def _load_weights(self, checkpoint: str) -> bool:
        """Load a checkpoint's full-model weights into the model through `from_pretrained`, strictly; False where the
        Trainer's own loading applies (a PEFT adapter, DeepSpeed, FSDP).

        transformers 5.23 saves the VLMs (Llava, Qwen2-VL, ...) under their hub key names (a conversion mapping),
        while the Trainer loads a checkpoint back with a plain `load_state_dict(strict=False)`, which matches none
        of those keys and only warns: `keep: best` then kept the last weights, and a resumed run went on from the
        weights it had just loaded instead of the checkpoint's. `from_pretrained` applies the mapping.
        """
        model = self.accelerator.unwrap_model(self.model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, PreTrainedModel) or \
                getattr(model, "peft_config", None):
            return False
        saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is not None or not self._load_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_weights(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _issue_warnings_after_load(self, load_result):
        # Loading the best checkpoint, transformers 5.23 reports a tied weight (NLLB's embed_tokens and lm_head, tied
        # to `shared`) as missing, though it is the very tensor its source loaded into: drop those, keep the rest.
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)


class ScoredTrainer(ScoredEvaluation, Trainer):
    pass


class ScoredSeq2SeqTrainer(ScoredEvaluation, Seq2SeqTrainer):
    pass


def selection(state, args) -> dict:
    """Which step's weights were kept and their score: the best evaluation under `keep: best`, else the last step,
    scored by the evaluation there (the Trainer always evaluates at the last step). With every evaluation's score,
    for training.json and the plots. From the Trainer's state and arguments, so that a callback can call it too."""
    metric = args.metric_for_best_model
    evaluations = [{"step": log["step"], "score": log[f"eval_{metric}"]}
                   for log in state.log_history if f"eval_{metric}" in log]
    if args.load_best_model_at_end and state.best_global_step:
        kept = {"step": state.best_global_step, "score": state.best_metric}
    else:
        kept = next((e for e in evaluations if e["step"] == state.global_step),
                    {"step": state.global_step, "score": None})
    return {"keep": "best" if args.load_best_model_at_end else "last", "metric": metric,
            "greater_is_better": args.greater_is_better, **kept,
            "stopped_early": state.global_step < state.max_steps, "evaluations": evaluations}


def describe(state, args) -> str:
    """The one-line summary of the selection: "kept step 600 (best loss 0.0213)"."""
    kept = selection(state, args)
    score = "unscored" if kept["score"] is None else f"{kept['metric']} {kept['score']:.4g}"
    return f"kept step {kept['step']} ({kept['keep']} {score})"
