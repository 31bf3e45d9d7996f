"""Caption metrics: BLEU-4 (sacrebleu), ROUGE-L (rouge-score), exact match, and for the synthetic set the accuracy
of the attributes (color, shape, direction) read back from the generated caption."""
import sacrebleu
from rouge_score import rouge_scorer


def bleu(predictions: list[str], references: list[str]) -> float:
    return sacrebleu.corpus_bleu(predictions, [references]).score


def rouge_l(predictions: list[str], references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return 100 * sum(scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references)) / max(1, len(predictions))


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references)) / max(1, len(predictions))


def read_attributes(caption: str, vocabulary: dict[str, set[str]]) -> dict[str, str | None]:
    """For each attribute, the first word of the caption that is one of its known values (None if none is)."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    return {name: next((w for w in words if w in values), None) for name, values in vocabulary.items()}


def attribute_accuracy(predictions: list[str], truths: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy and their mean (`attribute_accuracy`) over samples with ground-truth attributes."""
    vocabulary = {name: {t[name] for t in truths} for name in truths[0]} if truths else {}
    read = [read_attributes(p, vocabulary) for p in predictions]
    scores = {f"{name}_accuracy": sum(r[name] == t[name] for r, t in zip(read, truths)) / len(truths)
              for name in vocabulary}
    if scores:
        scores["attribute_accuracy"] = sum(scores.values()) / len(scores)
    return scores


def caption_scores(predictions: list[str], rows: list[dict]) -> dict[str, float]:
    references = [row["target"] for row in rows]
    scores = {"bleu": bleu(predictions, references), "rouge_l": rouge_l(predictions, references),
              "exact_match": exact_match(predictions, references)}
    with_truth = [(p, row["attributes"]) for p, row in zip(predictions, rows) if "attributes" in row]
    if with_truth:
        scores.update(attribute_accuracy(*map(list, zip(*with_truth))))
    return {name: round(value, 4) for name, value in scores.items()}
