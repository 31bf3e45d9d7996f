"""evaluate: greedy answers on the test split from both trained models and from their untrained starting weights.

Output: eval/metrics.json ({"seq2seq", "seq2seq_untrained", "vlm", "vlm_untrained"} -> BLEU-4, ROUGE-L, CIDEr-D,
METEOR, exact match, attribute accuracy; "vlm" is align_vlm's model when that stage trained one, and "vlm_sft" then
scores the train_vlm model it started from), eval/predictions.jsonl (one line per model and sample), and the tables of
the two comparison plots: eval/comparison.csv (the metrics on a 0-100 scale) and eval/cider_d.csv (CIDEr-D, whose
scale goes to 1000 with one reference per sample).
"""
import functools
import json
from pathlib import Path

from stages.common.console import quiet_libraries  # isort: skip  (first: quiets what libraries print on import)
from transformers import AutoModelForSeq2SeqLM, AutoProcessor, AutoTokenizer

from stages.common.files import atomic_files, read_jsonl, write_json, write_jsonl
from stages.common.params import load
from stages.models import vlm
from stages.results.answers import greedy_answers, source_prompts
from stages.results.metrics import caption_scores
from stages.training.trainer import final_output, trained_path

MANIFEST = Path("data/manifest")
MODELS = Path("models")
OUT = Path("eval")
SCALE_100 = {"bleu", "rouge_l", "meteor"}   # already 0-100; the other metrics are fractions


def answer_seq2seq(path: str, rows: list[dict], p: dict) -> list[str]:
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    prompts = functools.partial(source_prompts, tokenizer)
    return greedy_answers(model, tokenizer, prompts, rows, p["batch_size"], p["max_new_tokens"])


def answer_vlm(path: str, family: str, rows: list[dict], p: dict) -> list[str]:
    fam = vlm.family(family)
    processor, model = AutoProcessor.from_pretrained(path), vlm.load_model(fam, path).eval()
    prompts = functools.partial(vlm.generation_inputs, processor=processor, fam=fam)
    return greedy_answers(model, processor, prompts, rows, p["batch_size"], p["max_new_tokens"])


def write_comparison(out: Path, metrics: dict) -> None:
    """One bar per (metric, model). Fractions become percents so that they share an axis with BLEU, ROUGE-L and
    METEOR; CIDEr-D gets a plot of its own."""
    table, cider = ["entry,score"], ["entry,score"]
    for name, scores in metrics.items():
        for metric, value in scores.items():
            if metric == "cider_d":
                cider.append(f"cider_d / {name},{value}")
            else:
                table.append(f"{metric} / {name},{value if metric in SCALE_100 else round(100 * value, 2)}")
    (out / "comparison.csv").write_text("\n".join(table) + "\n")
    (out / "cider_d.csv").write_text("\n".join(cider) + "\n")


def main() -> None:
    quiet_libraries()
    # Load
    p = load("evaluate")["evaluate"]
    rows = read_jsonl(MANIFEST / "test.jsonl")
    seq2seq_record = json.loads((MODELS / "seq2seq" / "training.json").read_text())
    vlm_record = json.loads((MODELS / "vlm" / "training.json").read_text())
    final = final_output(MODELS, "vlm")   # align_vlm's model when it trained, else train_vlm's

    # Generate
    answers = {
        "seq2seq": answer_seq2seq(str(MODELS / "seq2seq" / "model"), rows, p),
        "seq2seq_untrained": answer_seq2seq(seq2seq_record["base_model"], rows, p),
        "vlm": answer_vlm(str(trained_path(final)), vlm_record["family"], rows, p),
        "vlm_untrained": answer_vlm(vlm_record["base_model"], vlm_record["family"], rows, p),
    }
    if final != MODELS / "vlm":   # the SFT model it was aligned from: what the alignment gained
        answers["vlm_sft"] = answer_vlm(str(trained_path(MODELS / "vlm")), vlm_record["family"], rows, p)

    # Score and save
    metrics = {name: caption_scores(predicted, rows) for name, predicted in answers.items()}
    with atomic_files(OUT) as out:
        write_json(out / "metrics.json", metrics)
        write_jsonl(out / "predictions.jsonl", [
            {"model": name, "id": row["id"], "prediction": answer, "reference": row["target"]}
            for name, predicted in answers.items() for row, answer in zip(rows, predicted)])
        write_comparison(out, metrics)
    for name, scores in metrics.items():
        print(f"evaluate: {name:18s} " + "  ".join(f"{k}={v}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
