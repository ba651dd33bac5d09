"""DVC stage ``vocab``: the naming vocabulary and SBERT embeddings of its C-score sample."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run
from pipeline.vocab import build_vocabulary, cscore_sample, noun_words, sbert_embeddings


def vocab(args) -> None:
    params = load_params(args.params)
    cfg = params.vocab
    out = Path(cfg.out_dir)
    with stage_run(params, "vocab", section=cfg.model_dump(mode="json"), lineage_dir=out) as run:
        words, counts = build_vocabulary(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        nouns = noun_words(words)
        (out / "nouns.txt").write_text("\n".join(nouns) + "\n", encoding="utf-8")
        counts["nouns"] = len(nouns)
        sample = cscore_sample(words, cfg.cscore_words, cfg.seed)
        embeddings = sbert_embeddings(sample)
        pq.write_table(pa.table({"word": sample, "embedding": pa.array(list(embeddings), pa.list_(pa.float32()))}),
                       out / "sbert.parquet")
        write_json(out / "manifest.json", {"counts": counts, "cscore_words": len(sample)})
        run.publish({"words": counts})
        run.log_outputs([out])
    print(f"vocab: {counts['vocabulary']} words ({counts}); SBERT sample {len(sample)} -> {out}")


def main(argv=None) -> None:
    run_stage(vocab, stage_parser("vocab", __doc__), argv)


if __name__ == "__main__":
    main()
