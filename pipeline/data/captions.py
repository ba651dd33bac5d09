"""The words of a caption, as the caption-based evaluations read them (tagging, naming, QA)."""

from __future__ import annotations

import re

CAPTION_WORD = re.compile(r"[a-z][a-z'-]*")


def caption_words(text: str) -> set[str]:
    """The lower-case words of a caption, each also as its singular when it ends in s / es, so
    a tag "dog" matches "dogs" and "bench" matches "benches"."""
    words = set(CAPTION_WORD.findall(text.lower()))
    singular = {w[:-2] for w in words if w.endswith("es")} | {w[:-1] for w in words if w.endswith("s")}
    return words | singular
