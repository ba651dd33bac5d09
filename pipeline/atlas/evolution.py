"""Feature evolution over training (paper §3.3, Fig 5, 6, 10-15): the same feature index names
the same parameters at every snapshot, so naming each snapshot and lining the rows up by index
shows when a feature acquires its concept, whether its name settles, and how the split into
image-only / text-only / multimodal features moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.metrics.modality import modality_summary


def _jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def evolution_table(snapshots: Sequence[tuple[str, pa.Table, np.ndarray]]) -> pa.Table:
    """Long table, one row per feature per snapshot, from ``(tag, naming table, modality scores)``
    in training order (naming tables as :func:`pipeline.atlas.naming.name_features` writes).

    Columns: feature, checkpoint, name, words, images, modality, renamed (name differs from the
    previous snapshot's), words_vs_final / images_vs_final (Jaccard overlap with the last
    snapshot's top words / images).
    """
    if not snapshots:
        raise ValueError("no evolution snapshots to compare (train.evolution empty or extract.evolution_vocab 0)")
    final = snapshots[-1][1]
    final_words, final_images = final.column("words").to_pylist(), final.column("images").to_pylist()
    columns: dict[str, list] = {c: [] for c in ("feature", "checkpoint", "name", "words", "images", "modality",
                                               "renamed", "words_vs_final", "images_vs_final")}
    previous: list | None = None
    for tag, table, modality in snapshots:
        names, words, images = (table.column(c).to_pylist() for c in ("name", "words", "images"))
        columns["feature"].extend(table.column("feature").to_pylist())
        columns["checkpoint"].extend([tag] * table.num_rows)
        columns["name"].extend(names)
        columns["words"].extend(words)
        columns["images"].extend(images)
        columns["modality"].extend(float(m) for m in modality)
        columns["renamed"].extend(previous is not None and n != p for n, p in zip(names, previous or names))
        columns["words_vs_final"].extend(_jaccard(w, f) for w, f in zip(words, final_words))
        columns["images_vs_final"].extend(_jaccard(i, f) for i, f in zip(images, final_images))
        previous = names
    return pa.table(columns)


def evolution_summary(table: pa.Table) -> dict[str, dict[str, float]]:
    """Per snapshot: modality split (Fig 6), share of features already carrying their final
    name, features renamed since the previous snapshot, mean top-word / top-image overlap with
    the final snapshot."""
    checkpoints = list(dict.fromkeys(table.column("checkpoint").to_pylist()))
    tags = np.asarray(table.column("checkpoint").to_pylist(), dtype=object)
    names = np.asarray(table.column("name").to_pylist(), dtype=object)
    final_names = names[tags == checkpoints[-1]]
    summary = {}
    for tag in checkpoints:
        here = tags == tag
        modality = np.asarray(table.column("modality").to_numpy(zero_copy_only=False))[here]
        summary[tag] = {
            **{f"modality.{k}": v for k, v in modality_summary(modality).items()},
            "final_name_share": float(np.mean(names[here] == final_names)),
            "renamed": int(np.asarray(table.column("renamed").to_pylist())[here].sum()),
            "words_vs_final": float(np.nanmean(np.asarray(table.column("words_vs_final").to_pylist(), float)[here])),
            "images_vs_final": float(np.nanmean(np.asarray(table.column("images_vs_final").to_pylist(), float)[here])),
        }
    return summary
