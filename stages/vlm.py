"""DVC stage ``vlm``: two-stage training of a VLM on each encoder in ``vlm.variants`` (Ray
Train), then QA on held-out images, sparse vs dense side by side (paper Tab 3)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run, tracking_uri
from pipeline.vlm.evaluate import answer_all, qa_metrics
from pipeline.vlm.train import held_out_examples, load_vlm, run_vlm_training


def vlm(args) -> None:
    params = load_params(args.params)
    cfg, results = params.vlm, {}
    for variant in cfg.variants:
        out_dir = Path(cfg.out_dir) / variant
        with stage_run(params, "vlm", variant=variant, section=cfg.model_dump(mode="json"),
                       upstream=[Path(params.train.out_dir) / variant], lineage_dir=out_dir.parent) as run:
            run_vlm_training(params, variant, run_id=run.run_id, tracking_uri=tracking_uri())
            model = load_vlm(out_dir)
            images, examples, _ = held_out_examples(params, model, limit=cfg.eval_images)
            answers = answer_all(model, images, examples, cfg.eval_batch_size, cfg.max_new_tokens,
                                 desc=f"QA {variant}")
            results[variant] = qa_metrics(answers, examples)
            run.publish({"qa": results[variant]})
            write_json(out_dir / "answers.json", [{**e, "prediction": a} for e, a in zip(examples, answers)])
            run.log_outputs([out_dir / "vlm.json", out_dir / "answers.json"])
        print(f"vlm[{variant}]: " + ", ".join(f"{k} {v:.3f}" for k, v in results[variant].items() if "exact" in k))
    write_json(Path(params.metrics.out_dir) / "vlm.json", results)


def main(argv=None) -> None:
    run_stage(vlm, stage_parser("vlm", __doc__), argv)


if __name__ == "__main__":
    main()
