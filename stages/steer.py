"""DVC stage ``steer``: concept steering of the sparse VLM (paper Fig 8b) over a grid of K and
SS, against random edits of the same size; curves, a qualitative table, metrics/steering.json."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.io import write_json
from pipeline.plots import plot_curves
from pipeline.tracking import flatten, stage_run
from pipeline.vlm.questions import QUESTIONS, answers_from_truth
from pipeline.vlm.steering import steering_evaluation
from pipeline.vlm.train import load_vlm, qa_examples


def steer(args) -> None:
    params = load_params(args.params)
    cfg = params.steer
    vlm_dir = Path(params.vlm.out_dir) / cfg.variant
    plot_dir = Path("plots/steer")
    with stage_run(params, "steer", variant=cfg.variant, section=cfg.model_dump(mode="json"), upstream=[vlm_dir],
                   lineage_dir=plot_dir) as run:
        model = load_vlm(vlm_dir)
        images, _, metas = qa_examples(params.sample.out_dir, "test", params.vlm, ClipBatchPreprocessor(
            model.encoder.image_size, model.encoder.context_length), limit=cfg.images)
        labels = [answers_from_truth(m["truth"])[cfg.question_type] for m in metas]
        classes = sorted(set(labels))
        result = steering_evaluation(model, images, labels, classes, QUESTIONS[cfg.question_type], cfg.ks,
                                     cfg.strengths, seed=params.project.seed, batch_size=params.vlm.eval_batch_size,
                                     max_new_tokens=params.vlm.max_new_tokens, max_words=cfg.max_words)
        numbers = {k: v for k, v in flatten(result).items() if isinstance(v, (int, float))}
        path = write_json(Path(cfg.out_dir) / "steering.json", numbers)
        write_json(plot_dir / "examples.json", {k: g["examples"] for k, g in result["grid"].items()})
        (plot_dir / "examples.md").write_text(qualitative_table(result))
        for k in cfg.ks:
            rows = {g["strength"]: {m: g[m] for m in ("sim_true", "sim_boosted", "random.sim_boosted", "corruption",
                                                      "boosted_rate", "random.boosted_rate")}
                    for g in result["grid"].values() if g["k"] == k}
            plot_curves(rows, [["sim_true", "sim_boosted", "random.sim_boosted"],
                               ["boosted_rate", "random.boosted_rate", "corruption"]],
                        plot_dir / f"steering_k{k}.png", title=f"steering, K = {k}", xlabel="steering strength SS")
        run.log_metrics(numbers)
        run.log_outputs([path, plot_dir])
    best = max(result["grid"].values(), key=lambda g: g["sim_boosted"])
    print(f"steer: K={best['k']} SS={best['strength']:g}: similarity to boosted {best['sim_boosted']:.3f} "
          f"(random edits {best['random.sim_boosted']:.3f}), to true {best['sim_true']:.3f} -> {path}")


def qualitative_table(result: dict) -> str:
    lines = ["| K | SS | true | boosted | before | after |", "|---|---|---|---|---|---|"]
    for g in result["grid"].values():
        for e in g["examples"][:4]:
            lines.append(f"| {g['k']} | {g['strength']:g} | {e['true']} | {e['boosted']} | {e['before']} | "
                         f"{e['after']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_stage(steer, stage_parser("steer", __doc__), argv)


if __name__ == "__main__":
    main()
