"""Question-answer pairs for VLM training and evaluation.

On the embedded data they come from each image's ground truth, one per question type (the
paper's "What's the main subject in this image? Your answer needs to be short." plus colour,
count and rendered-text questions). On captioned photos the subject question is answered from
the captions (:func:`qa_from_captions`). For real runs any image-QA set works as JSONL lines
``{"key": <sample image key>, "type": ..., "question": ..., "answer": ...}``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

QUESTIONS = {
    "subject": "What's the main subject in this image? Your answer needs to be short.",
    "colour": "What colour is the main object? Answer in one word.",
    "count": "How many shapes are in the image? Answer in one word.",
    "text": "What word is written in the image? Answer in one word, or none.",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


def answers_from_truth(truth: Mapping[str, Any]) -> dict[str, str]:
    """The answer to every question type, from a generated record's ground truth."""
    objects = truth["objects"]
    main = objects[truth.get("main", 0)]
    word = truth.get("word")
    return {
        "subject": f"{main['colour']} {main['shape']}",
        "colour": main["colour"],
        "count": NUMBERS[len(objects)] if len(objects) < len(NUMBERS) else str(len(objects)),
        "text": word["text"] if word else "none",
    }


def qa_from_truth(metas: Sequence[Mapping[str, Any]], types: Sequence[str]) -> list[dict[str, Any]]:
    """One example per (image, question type): ``image`` indexes ``metas``."""
    unknown = [t for t in types if t not in QUESTIONS]
    if unknown:
        raise ValueError(f"vlm.question_types: unknown {unknown}; known: {list(QUESTIONS)}")
    examples = []
    for i, meta in enumerate(metas):
        truth = meta.get("truth")
        if not truth:
            continue
        for qtype, answer in answers_from_truth(truth).items():
            if qtype in types:
                examples.append({"image": i, "type": qtype, "question": QUESTIONS[qtype], "answer": answer})
    return examples


def qa_from_jsonl(path: str | Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Examples from a JSONL file, for the images among ``keys``; lines naming other images are
    skipped, malformed lines are errors naming the line."""
    position = {k: i for i, k in enumerate(keys)}
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, question, answer = row["key"], row["question"], row["answer"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path}:{number}: expected JSON with key, question, answer ({err})") from None
        if key in position:
            examples.append({"image": position[key], "type": row.get("type", "qa"), "question": question,
                             "answer": answer})
    return examples


def qa_from_captions(metas: Sequence[Mapping[str, Any]], captions: Mapping[str, Sequence[str]],
                     types: Sequence[str]) -> list[dict[str, Any]]:
    """Real photos, which carry captions and no ground truth: the subject question, answered by the
    noun most of the photo's captions use ("dog", "girl", "people"; ties to the one the first
    caption uses first). One example per photo (its first record), since a photo's five caption
    records share one image. Other question types need ``vlm.qa_path``."""
    from pipeline.data.captions import caption_words
    from pipeline.vocab import noun_words

    if "subject" not in types:
        return []
    words_of = {group: [caption_words(c) for c in texts] for group, texts in captions.items()}
    nouns = set(noun_words(sorted({w for lists in words_of.values() for words in lists for w in words})))
    examples, seen = [], set()
    for i, meta in enumerate(metas):
        group = str(meta.get("group", meta.get("key")))
        if group in seen or group not in words_of:
            continue
        seen.add(group)
        counts = Counter(w for words in words_of[group] for w in words & nouns)
        if counts:
            first = " ".join(captions[group][0].lower().split())
            best = max(counts.items(), key=lambda item: (item[1], -_position(first, item[0])))[0]
            examples.append({"image": i, "type": "subject", "question": QUESTIONS["subject"], "answer": best})
    return examples


def _position(text: str, word: str) -> int:
    found = text.find(word)
    return found if found >= 0 else len(text)


def normalise(answer: str) -> str:
    """Lower case, no punctuation, no articles: 'A red circle.' -> 'red circle'."""
    words = re.findall(r"[a-z0-9]+", answer.lower())
    return " ".join(w for w in words if w not in {"a", "an", "the"})
