"""Scene captions read back and scored: a caption parsed into objects and matched to a scene's ground truth.

A scene (`recaption.eval.synthetic`) has a background and up to six objects, each in its own cell of a 3×3 grid, so
a position names at most one object. A caption is read sentence by sentence: a sentence that mentions the background
states the background; any other sentence that states at least one object attribute (size, texture, colour, shape,
position) describes one object. Reading is tolerant of case, spacing, sentence order, missing attributes, unknown
words, "gray"/"center" spellings; a last sentence without its full stop was cut off by the token limit and is not
read. Described objects are matched to the truth by position; a description at an empty position, a second one at a
taken position, or one without a position is extra.

A scene made with text (`make_scene(..., text=True)`) also has a word written in a free cell. A sentence that
mentions "written" or "word" states it: the word is the first quoted one (else the one after "word"), the position as
for objects. The text is scored only where the truth or the caption has some: right when both word and position are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from recaption.eval import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES

ATTRIBUTES = ("shape", "colour", "size", "texture")  # scored per matched object; position is what matches
_VOCAB = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "texture": TEXTURES,
    "position": tuple(POSITIONS),
}
_SPELLINGS = {"gray": "grey", "center": "centre", "color": "colour"}
_SENTENCE_END = re.compile(r"[.!?]")
_QUOTED = re.compile(r"[\"“”‘’']([^\"“”‘’']+)[\"“”‘’']")
TEXT_KEYS = ("text_truth", "text_described", "text_correct", "text_word_correct")


def _words(text: str) -> list[str]:
    return [_SPELLINGS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]


def _find(words: list[str], phrases: Iterable[str]) -> str | None:
    """The first phrase (one or more words) that occurs in `words`, scanning left to right, longest phrase first at
    each place ("top left" before "top")."""
    by_length = sorted((p.split() for p in phrases), key=len, reverse=True)
    for i in range(len(words)):
        for phrase in by_length:
            if words[i : i + len(phrase)] == phrase:
                return " ".join(phrase)
    return None


def complete_sentences(text: str) -> list[str]:
    """The sentences of `text` that end with . ! or ?; trailing text without one is a truncated sentence, dropped."""
    parts = _SENTENCE_END.split(text)
    return [p for p in parts[:-1] if p.strip()]


def _parse_text(sentence: str, words: list[str]) -> dict[str, str]:
    """{"word", "position"} (each only when stated) of a sentence about the written word."""
    quoted = _QUOTED.search(sentence)
    if quoted:
        word = " ".join(quoted.group(1).lower().split())
        rest = _words(sentence[: quoted.start()] + " " + sentence[quoted.end() :])
    else:
        after = words.index("word") + 1 if "word" in words else len(words)
        word = words[after] if after < len(words) and words[after] not in ("is", "was", "written") else ""
        rest = words
    position = _find(rest, POSITIONS)
    return {k: v for k, v in (("word", word), ("position", position)) if v}


def parse_caption(text: str) -> dict[str, Any]:
    """{"background": name or None, "objects": [{attribute: value, …}, …]} in the caption's order, plus "text"
    {"word", "position"} when a sentence states a written word; an object has only the attributes its sentence
    states. The first background sentence that names a background wins, and the first text sentence."""
    background = None
    objects = []
    written: dict[str, str] | None = None
    for sentence in complete_sentences(text or ""):
        words = _words(sentence)
        if "background" in words:
            background = background or _find(words, BACKGROUNDS)
            continue
        if "written" in words or "word" in words:
            written = written if written is not None else _parse_text(sentence, words)
            continue
        obj = {attr: value for attr, vocab in _VOCAB.items() if (value := _find(words, vocab)) is not None}
        if obj:
            objects.append(obj)
    return {"background": background, "objects": objects} | ({"text": written} if written is not None else {})


def score_caption(text: str, truth: Mapping[str, Any]) -> dict[str, Any]:
    """Counts and rates of one caption against one scene's truth (`Scene.truth()`); see the module docstring.

    Counts: `truth_objects`, `described`, `matched` (truth objects described at their position), `extra` (described
    objects not matched: `hallucinated` ones at an empty or already described position, plus `unplaced` ones with
    no position), `attributes` {attribute: correct among matched}, `correct_objects` (matched with every attribute
    right), `background_correct`, `exact` (everything right, nothing extra). Rates: `recall`, `precision`,
    `accuracy` {attribute: correct / matched}, `object_accuracy` (correct objects / truth objects).

    Where the truth or the caption has text, also `text_truth` and `text_described` (0 or 1), `text_correct` (word
    and position right), `text_word_correct` (word right, anywhere) and the rate `text_accuracy`; text stated where
    the truth has none, or wrong text, makes the caption not `exact`."""
    parsed = parse_caption(text)
    truth_at = {o["position"]: o for o in truth["objects"]}
    matched: dict[str, dict[str, str]] = {}
    hallucinated = unplaced = 0
    for obj in parsed["objects"]:
        position = obj.get("position")
        if position is None:
            unplaced += 1
        elif position in truth_at and position not in matched:
            matched[position] = obj
        else:
            hallucinated += 1
    attributes = {a: sum(obj.get(a) == truth_at[p][a] for p, obj in matched.items()) for a in ATTRIBUTES}
    correct_objects = sum(all(obj.get(a) == truth_at[p][a] for a in ATTRIBUTES) for p, obj in matched.items())
    n_truth, n_described, n_matched = len(truth_at), len(parsed["objects"]), len(matched)
    background_correct = parsed["background"] == truth["background"]
    counts = {
        "truth_objects": n_truth,
        "described": n_described,
        "matched": n_matched,
        "extra": hallucinated + unplaced,
        "hallucinated": hallucinated,
        "unplaced": unplaced,
        "attributes": attributes,
        "correct_objects": correct_objects,
        "background_correct": background_correct,
        "exact": background_correct and correct_objects == n_truth and n_described == n_truth,
    }
    if "text" in truth or "text" in parsed:
        true_text, said = truth.get("text"), parsed.get("text")
        word_right = bool(true_text and said and said.get("word") == true_text["word"])
        counts |= {
            "text_truth": int(true_text is not None),
            "text_described": int(said is not None),
            "text_correct": int(word_right and said.get("position") == true_text["position"]),
            "text_word_correct": int(word_right),
        }
        counts["exact"] = counts["exact"] and (said == true_text if true_text else said is None)
    return {**counts, **_rates(counts, captions=1)}


def _rates(c: Mapping[str, Any], captions: int) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    rates = {
        "recall": ratio(c["matched"], c["truth_objects"]),
        "precision": ratio(c["matched"], c["described"]),
        "accuracy": {a: ratio(c["attributes"][a], c["matched"]) for a in ATTRIBUTES},
        "object_accuracy": ratio(c["correct_objects"], c["truth_objects"]),
        "extra_per_caption": ratio(c["extra"], captions),
    }
    if "text_truth" in c:
        rates["text_accuracy"] = ratio(c["text_correct"], c["text_truth"])
    return rates


def aggregate(scores: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Micro-averages over captions: every rate is a ratio of counts summed over all captions (an object is an
    object whichever scene it is in); `background_accuracy` and `exact_rate` are fractions of captions."""
    keys = ("truth_objects", "described", "matched", "extra", "hallucinated", "unplaced", "correct_objects")
    total: dict[str, Any] = {k: sum(s[k] for s in scores) for k in keys}
    total["attributes"] = {a: sum(s["attributes"][a] for s in scores) for a in ATTRIBUTES}
    if any("text_truth" in s for s in scores):  # captions scored without text count 0 for it
        total |= {k: sum(s.get(k, 0) for s in scores) for k in TEXT_KEYS}
    n = len(scores)
    total["background_correct"] = sum(bool(s["background_correct"]) for s in scores)
    total["exact"] = sum(bool(s["exact"]) for s in scores)
    return {
        "captions": n,
        **total,
        **_rates(total, captions=n),
        "background_accuracy": total["background_correct"] / n if n else 0.0,
        "exact_rate": total["exact"] / n if n else 0.0,
    }


def score_output(
    output_dir: str, truths: Mapping[str, Mapping[str, Any]], model: str | None = None, prompt: str = "detailed"
) -> dict[str, Any]:
    """Scores a pipeline output's captions against `truths` {key: truth}: per key, the first caption with `prompt`
    (and `model`, when given). A truth whose row is missing, failed or has no such caption scores as an empty
    caption (every object missed). Returns `aggregate` over all truths plus `missing` (no caption: no row, a failed
    row, or no caption of that model/prompt), `failed` (rows not ok), `truncated` (captions that hit the token
    limit), `models` (the model ids scored) and `unscored_rows` (rows without a truth)."""
    import pyarrow.dataset as pads

    from recaption.job import open_output
    from recaption.outputs import part_paths

    out = open_output(str(output_dir))  # local or object storage, as the pipeline wrote it
    dataset = pads.dataset(part_paths(out), filesystem=out.fs, format="parquet")
    table = dataset.to_table(columns=["key", "status", "captions"])
    rows = {r["key"]: r for r in table.to_pylist()}
    scores, models = [], set()
    missing = failed = truncated = 0
    for key, truth in truths.items():
        row = rows.get(key)
        caption = None
        if row is not None and row["status"] != "ok":
            failed += 1
        elif row is not None:
            caption = next(
                (
                    c
                    for c in row["captions"] or []
                    if c["prompt"] == prompt and (model is None or c["model"] == model) and c["text"] is not None
                ),
                None,
            )
        if caption is None:
            missing += 1
        else:
            models.add(caption["model"])
            truncated += caption.get("finish_reason") == "length"
        scores.append(score_caption(caption["text"] if caption else "", truth))
    return {
        **aggregate(scores),
        "missing": missing,
        "failed": failed,
        "truncated": truncated,
        "models": sorted(models),
        "prompt": prompt,
        "unscored_rows": len(set(rows) - set(truths)),
    }


def format_scores(result: Mapping[str, Any]) -> str:
    """A short table of `score_output`'s (or `aggregate`'s) result."""
    acc = result["accuracy"]
    lines = [
        f"captions scored            {result['captions']}"
        + (f" ({result['missing']} without a caption, scored as empty)" if result.get("missing") else ""),
        f"objects found (recall)     {result['recall']:6.1%}  {result['matched']} of {result['truth_objects']}",
        f"objects real (precision)   {result['precision']:6.1%}  {result['matched']} of {result['described']} described"
        f"; {result['extra']} extra",
        "attributes right (found)   " + "  ".join(f"{a} {acc[a]:.1%}" for a in ATTRIBUTES),
        f"objects fully right        {result['object_accuracy']:6.1%}  {result['correct_objects']} of "
        f"{result['truth_objects']}",
        f"background right           {result['background_accuracy']:6.1%}",
        *(
            [
                f"text right                 {result['text_accuracy']:6.1%}  {result['text_correct']} of "
                f"{result['text_truth']} (word right anywhere: {result['text_word_correct']}; "
                f"{result['text_described']} stated)"
            ]
            if "text_accuracy" in result
            else []
        ),
        f"captions exactly right     {result['exact_rate']:6.1%}  {result['exact']} of {result['captions']}",
    ]
    return "\n".join(lines)
