"""What a trained model's image embedding holds, concept family by concept family: a linear probe.

Zero-shot accuracy mixes two questions: does the image embedding carry a concept, and does the
text tower name it where the images are. A logistic-regression probe on the unit-norm image
embeddings (fitted on train images, scored on the test split, the label of each family as the
zero-shot tasks read it) answers the first alone: a family the probe cannot read is missing from
the image side; one the probe reads but zero-shot misses is a text-side (alignment) gap.

    python -m benchmarks.linear_probe                     # the committed models (models/<variant>)
    python -m benchmarks.linear_probe --variants sparse --train-images 2000
    cd ../main-long && python -m benchmarks.linear_probe --tag long   # another workspace's models

Prints one row per model and writes ``benchmarks/results/linear_probe[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def embeddings(model, data_dir: str, split: str, limit: int | None) -> tuple[np.ndarray, list[dict]]:
    """Unit-norm image embeddings of a split (up to ``limit`` images) and each image's meta."""
    import torch

    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    arrays, metas = load_split_arrays(data_dir, split, ClipBatchPreprocessor.for_model(model),
                                      limit=limit)
    images = torch.as_tensor(arrays["image"])
    with torch.no_grad():
        rows = torch.cat([model.encode_image(images[i:i + 256]) for i in range(0, len(images), 256)]).numpy()
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12), metas


def labelled(rows: np.ndarray, metas: list[dict], task: str) -> tuple[np.ndarray, list[str]]:
    """The rows whose record has a label for ``task`` (the zero-shot tasks' labels), with those labels."""
    from pipeline.data.evalsets import zero_shot_label

    labels = [zero_shot_label(m, task) for m in metas]
    keep = [i for i, label in enumerate(labels) if label is not None]
    return rows[keep], [labels[i] for i in keep]


def probe(train: tuple[np.ndarray, list[dict]], test: tuple[np.ndarray, list[dict]], task: str) -> float:
    """Test accuracy of a logistic regression fitted on the train rows that have a label."""
    from sklearn.linear_model import LogisticRegression

    x, y = labelled(*train, task)
    return float(LogisticRegression(max_iter=2000, C=10.0).fit(x, y).score(*labelled(*test, task)))


def main() -> None:
    import torch

    from pipeline.clip.model import load_model
    from pipeline.config import load_params
    from pipeline.data.evalsets import load_zero_shot_tasks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variants", nargs="*", default=None, help="default: every train.variants entry")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", help="results file suffix (linear_probe_<tag>.json), e.g. for another workspace")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    data_dir = params.sample.out_dir
    tasks = list(load_zero_shot_tasks(data_dir))
    rows = []
    for variant in args.variants or list(params.train.variants):
        model = load_model(Path(params.train.out_dir) / variant)
        train = embeddings(model, data_dir, "train", args.train_images)
        test = embeddings(model, data_dir, "test", None)
        zero_shot = json.loads((Path(params.metrics.out_dir) / f"{variant}.json").read_text())
        row = {"variant": variant, "train_images": len(train[1]), "test_images": len(test[1]),
               "probe": {task: probe(train, test, task) for task in tasks},
               "zero_shot": {task: zero_shot.get(f"zeroshot.{task}.top1") for task in tasks},
               "chance": {task: zero_shot.get(f"zeroshot.{task}.chance") for task in tasks}}
        rows.append(row)
        print(f"{variant:12s} " + "  ".join(f"{t} {row['probe'][t]:.2f} (zero-shot {row['zero_shot'][t] or 0:.2f})"
                                            for t in tasks), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"linear_probe{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
