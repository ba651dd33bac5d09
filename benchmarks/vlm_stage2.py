"""What VLM stage 2 tunes, side by side: the whole LM (the paper's "adapter and LLM together", the
default), every decoder block with the tied token embeddings frozen, and only the top blocks.

Each setting trains the ``vlm`` stage's VLM in this process (:func:`pipeline.vlm.train.two_stage_training`,
the Ray Train worker's loop, with ``params.yaml``'s steps, batch and learning rates and the same
seed) on the trained ``models/<variant>`` encoder, then answers ``--eval-images`` held-out test
images (4x the stage's 48, so that a difference of a few points is more than noise), and reports
the training time, the final loss, the size of the tuned LM weights the stage saves
(``lm_trained.pt``) and each question type's exact match against its chance level.

    python -m benchmarks.vlm_stage2                      # after the train stage (models/sparse)
    python -m benchmarks.vlm_stage2 --only whole --set vlm.stage2_lr=2.0e-5

Writes ``benchmarks/results/vlm_stage2_cpu.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.sparsity_tradeoff import parse_overrides, selected, settings_parser

RESULTS = Path(__file__).resolve().parent / "results"
ALL_BLOCKS = -1  # stands for the LM's depth, read off the loaded model

# name -> vlm.lm_layers (None: every parameter of the LM)
SETTINGS: dict[str, int | None] = {
    "whole LM (default, the paper)": None,
    "every block, token embeddings frozen": ALL_BLOCKS,
    "top 4 blocks": 4,
}


def measure(name: str, layers: int | None, params, eval_images: int) -> dict:
    """Train one setting from the same seed and score it on the held-out images."""
    import torch

    from pipeline.data.loading import ClipBatchPreprocessor
    from pipeline.vlm.evaluate import answer_all, qa_metrics
    from pipeline.vlm.language_model import prepare_language_model
    from pipeline.vlm.train import (
        build_vlm,
        qa_examples,
        trained_lm_state,
        two_stage_training,
    )

    cfg = params.vlm
    lm_dir = prepare_language_model(cfg.language_model, cfg.lm_cache)
    torch.manual_seed(params.project.seed)
    vlm = build_vlm(Path(params.train.out_dir) / cfg.variants[0], lm_dir, cfg)
    if layers == ALL_BLOCKS:
        layers = len(vlm.lm.model.layers)
    cfg = cfg.model_copy(update={"lm_layers": layers})
    preprocessor = ClipBatchPreprocessor.for_model(vlm.encoder)
    images, examples, _ = qa_examples(params.sample.out_dir, "train", cfg, preprocessor)
    start = time.perf_counter()
    loss = two_stage_training(vlm, images, examples, cfg, params.project.seed)
    seconds = time.perf_counter() - start
    saved = sum(t.numel() * t.element_size() for t in trained_lm_state(vlm, layers).values())
    images, examples, _ = qa_examples(params.sample.out_dir, "test", cfg, preprocessor, limit=eval_images)
    scores = qa_metrics(answer_all(vlm.eval(), images, examples, cfg.eval_batch_size, cfg.max_new_tokens), examples)
    return {"setting": name, "lm_layers": layers, "stage2_lr": cfg.stage2_lr,
            "steps": cfg.stage1_steps + cfg.stage2_steps, "train_seconds": round(seconds, 1),
            "final_loss": round(loss.item(), 3), "lm_trained_mb": round(saved / 1e6),
            "eval_images": eval_images,
            **{key: round(value, 3) for key, value in scores.items() if key.endswith((".exact", ".chance"))}}


def main() -> None:
    import torch

    from pipeline.config import load_params

    parser = settings_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--eval-images", type=int, default=192)
    parser.add_argument("--out", default=str(RESULTS / "vlm_stage2_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params, overrides=parse_overrides(args.set))
    rows = []
    for name, layers in selected(SETTINGS, args.only).items():
        row = measure(name, layers, params, args.eval_images)
        rows.append(row)
        print(f"{name:40s} {row['train_seconds']:6.1f} s  loss {row['final_loss']:.3f}  " + "  ".join(
            f"{key[:-6]} {row[key]:.3f} (chance {row[key[:-6] + '.chance']:.3f})"
            for key in row if key.endswith(".exact")), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
