"""The words of a caption, as the caption-based evaluations read them (tagging, naming, QA)."""

from __future__ import annotations

import re
from collections.abc import Iterable

CAPTION_WORD = re.compile(r"[a-z][a-z'-]*")


def caption_words(text: str) -> set[str]:
    """The lower-case words of a caption, each also as its singular when it ends in s / es, so
    a tag "dog" matches "dogs" and "bench" matches "benches"."""
    words = set(CAPTION_WORD.findall(text.lower()))
    singular = {w[:-2] for w in words if w.endswith("es")} | {w[:-1] for w in words if w.endswith("s")}
    return words | singular


def words_by_group(groups: Iterable[str], captions: Iterable[str]) -> dict[str, set[str]]:
    """Each photo's caption words (the union over its captions), by its group."""
    out: dict[str, set[str]] = {}
    for group, text in zip(groups, captions):
        out.setdefault(group, set()).update(caption_words(text))
    return out
