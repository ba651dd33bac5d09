"""docs/benchmarks.md, generated from the committed results in ``benchmarks/results/*.json``.

Every number in that page's tables is read from a result file here, so the page cannot drift from
the measurements: ``tests/test_docs.py`` fails when the committed page differs from what this
renders. What each benchmark measures, and what its numbers say, is prose kept below
(``BENCHMARKS`` and ``FILES``); a result file nobody described still gets its tables.

    python -m benchmarks.tables            # rewrite docs/benchmarks.md
    python -m benchmarks.tables --check    # exit 1 if docs/benchmarks.md is stale
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from benchmarks import fit_table
from pipeline import generated_page

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
LINK = "../benchmarks/results"  # RESULTS as seen from docs/

# Top-level keys that describe the machine a result was measured on.
MACHINE_KEYS = ("machine", "host", "cores", "cpus", "device", "gpu", "python", "torch", "numpy", "scipy")
LIST_CELL_MAX = 8  # a list of more scalars than this is shown by its length

PROBE_TABLES = {"rows": [("probe, test accuracy", ["variant", "train_images", "test_images", "probe.*"]),
                         ("zero-shot top-1", ["variant", "zero_shot.*"]),
                         ("chance (the most common class)", ["variant", "chance.*"])]}

# One entry per benchmark module, in the order of the page. ``about``: what it measures and what the
# numbers say (hand-written; no number here may restate a table's). ``command``: how to rerun it.
BENCHMARKS: list[dict[str, str]] = [
    {
        "module": "train_throughput",
        "title": "Training throughput: dense against the wide heads",
        "command": "python -m benchmarks.train_throughput\n"
                   "python -m benchmarks.train_throughput --arch ViT-B-32 --batch 256 --device cuda",
        "about": "Each configuration (dense, x32, x72, x128) trains the same number of steps on the same "
                 "synthetic batch in its own process, so its peak memory is its own and the ratios to dense "
                 "are measured under the same load. On the embedded tiny model the wide heads cost a modest "
                 "share of the step, growing with the width.",
    },
    {
        "module": "stage_startup",
        "title": "Stage start-up: cold against the warm stage server",
        "command": "python -m benchmarks.stage_startup",
        "about": "What the warm stage server (`pipeline/runtime/stage_server.py`, started by `make pipeline`) removes is "
                 "each stage's imports: torch, open_clip, MLflow, Ray, transformers and the pipeline. This times "
                 "`python -m stages <stage> --help` in a fresh interpreter (cold) and forked from the server "
                 "(warm), alternating; `embedded_run_total_s` sums each over the stage processes of the "
                 "embedded run, each stage counted as often as `dvc.yaml` runs it.",
    },
    {
        "module": "conv_layout",
        "title": "Convolution layout: the pretrained image encoders in NCHW against channels-last",
        "command": "python -m benchmarks.conv_layout",
        "about": "The tower cache runs EfficientNet-lite0 over every photo of the Flickr8k preset and the "
                 "reference stage runs lite2 over its test photos, the preset's two largest encoding costs on "
                 "2 cores. Each encoder (the packaged ImageNet weights on timm's model) encodes the same random "
                 "batch in torch's default layout and with its weights channels-last (`pipeline.clip.towers."
                 "channels_last`, which both stages' actors now use), alternating, on one thread as each actor "
                 "runs. oneDNN's convolutions run channels-last natively; the outputs differ by float rounding.",
    },
    {
        "module": "feature_cache_step",
        "title": "The feature cache: a training step from the cache against one from pixels and tokens",
        "command": "python -m benchmarks.feature_cache_step [--batch N]",
        "about": "The Flickr8k preset's towers (EfficientNet-lite0 at 224 px, MiniLM), one optimiser step of the "
                 "pipeline's recipe on the same synthetic batch: with both towers fully locked, from the inputs "
                 "and from the cache's pooled rows; with lite0's last group (block 6.0 and the head) training, "
                 "from the inputs and from the cache's feature maps (the input of block 6.0). A locked tower's "
                 "forward pass is nearly all of a step's cost; a trainable last block at 7 x 7 is most of what "
                 "is left once the cache holds the rest.",
    },
    {
        "module": "extract_throughput",
        "title": "Extraction: Ray Data against a plain loop",
        "command": "python -m benchmarks.extract_throughput",
        "about": "One model's extraction rows (images, captions, vocabulary, prompts, token grids, evolution "
                 "snapshots of `models/sparse`) encoded with the same encoder class and batch size, in a plain "
                 "single-process loop and through Ray Data's actor pool, end to end and in steady state (first "
                 "to last batch). In steady state the actor pool matches the loop, and scales with actors where "
                 "one actor's threads do not. End to end it pays its start-up (`first_batch_after_s`): actor "
                 "processes importing torch and open_clip, a fixed cost that 1.2M images amortise and 25k rows "
                 "do not. The light tasks that feed the actors live in the torch-free "
                 "`pipeline/activations/inputs.py`; when they sat in the module with the encoder, every task "
                 "worker imported torch too and an extraction took about 10 s longer.",
    },
    {
        "module": "sample_throughput",
        "title": "Sampling: the sample stage against a plain loop",
        "command": "python -m benchmarks.sample_throughput                     # 50k records\n"
                   "python -m benchmarks.sample_throughput --records 100000 "
                   "--out benchmarks/results/sample_throughput_cpu_100k.json",
        "about": "A synthetic webdataset source (tars of 10,000 pairs as img2dataset writes them, 64 x 64 JPEGs, "
                 "captions, `.json` sidecars) sampled in one run four ways that write byte-identical shards: "
                 "`plain_stream`, one process reading each tar once and validating, splitting and writing with "
                 "the stage's own functions; `plain_stage`, the stage's per-shard code called shard after shard "
                 "in one process; and `ray`, the stage itself (`run_sample`, one Ray Data task per shard) at 1, 2 "
                 "and 4 concurrent tasks. `paper_15m_hours` is a linear extrapolation from the measured records/s "
                 "per core to the paper's 15M pairs on 2, 16 and 64 cores, not a measurement; on a large node "
                 "reading 15M images off storage will set the pace before the cores do.\n\n"
                 "Each shard builder now seeks straight to a record's bytes: the driver's one scan of each tar, "
                 "which listing the keys needs anyway, writes every member's offset and size into the record's "
                 "ref. On a quiet machine the stage then beats the single-process loop by using both cores; per "
                 "core it runs at about 0.6x the loop, the price of Ray's tasks, object transfers and the shard "
                 "writes' fan-in. What the paper's scale would need next: the longer refs (~100 characters, "
                 "~1.5 GB for 15M on the driver; plan per tar instead of per record), and the driver's serial "
                 "scan of the tars (at 1,500 tars, about an hour of header reads before the first shard).",
    },
    {
        "module": "metrics_scale",
        "title": "Metrics at the paper's size",
        "command": "python -m benchmarks.metrics_scale        # ~10 min\n"
                   "python -m benchmarks.metrics_scale --threads 1,2 --rows 40000 --widths 55296 --sweep-rows 40000 "
                   "--metrics clarity,zeroshot,images_topk,labels_topk --tag threads",
        "about": "Synthetic stores as wide as the paper's ViT-L/14 Sparse+ (55,296 features, L0 ~ 400, Zipf-like "
                 "feature frequencies, 5% dead; CSR float32) with a 768-d reference, a text store and 1,000 "
                 "zero-shot classes; the pipeline's own metric functions run on them as `evaluate.py` and the "
                 "atlas call them, one fresh process per size. The fits give how CPU time and extra memory "
                 "(`peak_extra_gib`: the resident-set high-water mark during the call minus the resident set "
                 "before it) grow with rows and width, and extrapolate to 1.2M x 55,296: a forecast along each "
                 "metric's fitted rows exponent (time) and a straight line through its measured peaks (memory), "
                 "not a measurement. Its sum (`extrapolated_total_cpu_seconds`, `extrapolated_max_peak_extra_gib` "
                 "on top of `target_inputs_gib`) is the whole metrics pass on one thread, within the 32 GB target. "
                 "Wall times on a shared machine varied up to 5x with the other load, so compare CPU seconds.\n\n"
                 "Clarity, its baseline and `cosine_scores` work a block of rows at a time, so beyond a block "
                 "only their outputs grow. The metrics that cost most of the CPU time (Clarity, zero-shot with "
                 "all features, both top-k cuts) run their row blocks on a thread pool (`metrics.threads`; "
                 "`pipeline/metrics/_arrays.map_blocks`): the blocks do not depend on the thread count and "
                 "partial sums are folded in block order, so the numbers are the same bits on any count "
                 "(`tests/test_metrics.py`). At the 2-core efficiency, 16 cores would take the whole pass to "
                 "about 3 minutes (a forecast; no such machine here).\n\n"
                 "What the fixes between the `before` file and the others were (results unchanged; "
                 "`tests/test_metrics.py` checks each against dense brute force): labels' top-k zero-shot no "
                 "longer densifies the cut classifier; `keep_topk` sorts within rows a block at a time instead "
                 "of lexsorting all non-zeros; Clarity thresholds a block of rows at a time instead of a float64 "
                 "copy of the whole matrix; modality sums unit rows block by block; `feature_counts` and the "
                 "column sums run in chunks; `cosine_scores` converts a block of rows to float64 at a time.",
    },
    {
        "module": "sparse_transport",
        "title": "Sparse transport of the tiled loss's ring blocks, on gloo",
        "command": "python -m benchmarks.sparse_transport",
        "about": "Four gloo workers on loopback shift one ring block of the paper's shape (local batch 128 = "
                 "32,768 / 256 workers, image + text, width 55,296, fp32) with the loss's own `Transport`, dense "
                 "and as (index, value) pairs, at the densities training passes through, beside "
                 "`dist.all_gather` of the same block (what open_clip's `ClipLoss` does); the slowest rank's "
                 "median. A step of the tiled loss makes `step_data_shifts` such shifts. Bytes fall with density "
                 "as expected; time does not: on loopback the dense block moves at memory speed, and the sparse "
                 "path pays a count, a `nonzero`, a header round trip and a densify whatever it sends. With no "
                 "switch-over on gloo, `train.sparse_transport_density` stays null (dense) in `params.yaml` and "
                 "`deploy/params.paper.yaml` (`tests/test_benchmark_sparse_transport.py` holds both to this "
                 "file). Across nodes and on NCCL the balance differs: set the threshold from this benchmark "
                 "run on that transport.",
    },
    {
        "module": "loss_memory",
        "title": "The contrastive loss alone: open_clip against the tiled loss",
        "command": "python -m benchmarks.loss_memory --small        # CPU\n"
                   "bash benchmarks/gpu.sh loss                     # CUDA",
        "about": "`train.loss: tiled` swaps open_clip's `ClipLoss` for `TiledClipLoss` (`pipeline/clip/tiled_loss.py`): "
                 "the other workers' embedding blocks travel round a ring one at a time, logits are computed "
                 "tile by tile with a streaming logsumexp, and backward recomputes the tiles, so a worker's "
                 "memory is O(local batch x width), not O(global batch x width). Its loss and gradients equal "
                 "`ClipLoss(local_loss=True, gather_with_grad=True)` on 2 and 4 gloo workers "
                 "(`tests/test_tiled_loss.py`). Here one process plays rank 0 of the job (`benchmarks/simulated.py`): "
                 "the other workers' embeddings (1% non-zero, as a trained Sparse CLIP's) are made on the device, "
                 "open_clip's all_gather becomes a concatenation, and the time spent making the blocks "
                 "(`generate_ms`) is taken out (`net_ms`). Both losses give the same value (`value_diff`).\n\n"
                 "The CUDA file was measured with fp32 tiles; since then, under autocast, the tiled loss runs "
                 "its tile products in bf16 exactly where open_clip's `image @ text.T` runs in bf16, and keeps "
                 "the reductions and the gradient accumulation in fp32 (tested on CPU against a brute force and "
                 "against open_clip under the same autocast). The targets for bf16 tiles (the loss alone <= 1.1x "
                 "open_clip's time at x72, memory <= 1/8 of it) need a GPU run of `bash benchmarks/gpu.sh loss`, "
                 "which has not happened since the change, so they are not claimed.",
    },
    {
        "module": "train_step_gpu",
        "title": "A full training step on a GPU",
        "command": "bash benchmarks/gpu.sh step step-global\n"
                   "python -m benchmarks.fit_table          # the largest expansion per GPU, from step-global",
        "about": "Random init, bf16 autocast, fused AdamW, local batch 256, no gradient checkpointing; ViT-B-32 "
                 "and ViT-L-14 dense and at x72 / x128 (and x256 as rank 0 of the 32,768 global batch, the other "
                 "workers' embeddings simulated as for the loss alone). The width-dependent part is what "
                 "matters: with open_clip's loss the peak grows with the expansion about 14 times as fast as "
                 "with the tiled loss, so without checkpointing ViT-L-14 x72 fits an 80 GB card only with "
                 "`train.loss: tiled`, which also fits x128 and x256 there. The price, with the fp32 tiles of "
                 "these files, was time: a tiled ViT-L-14 x72 step took about 1.4x as long as open_clip's "
                 "(ViT-B-32: about 2.5x, where the loss is a larger share of the step); bf16 tiles are not yet "
                 "timed. On a cluster the ring's transfers overlap its compute; open_clip's all_gather, which "
                 "the simulation does not time, does not.",
    },
    {
        "module": "sparsity_tradeoff",
        "title": "Sparsity against dead features and accuracy",
        "command": "python -m benchmarks.sparsity_tradeoff      # the module's docstring has the Flickr8k and "
                   "one-object commands",
        "about": "Each setting of the sparsity knobs (head bias start, head learning rate, logit-scale cap) "
                 "trained with the pipeline's own step on the sampled data for the run's steps and batch, then "
                 "measured as the metrics stage measures: L0 (% of the width), the dead fraction (features that "
                 "fire on no test image / caption), colour zero-shot top-1 and val retrieval R@5. No setting "
                 "reaches both L0 <= 5% and dead <= 10% in this budget: the dead fraction rises with sparsity "
                 "along one curve, whichever knob moves along it. Why, and what the one-object test shows, is "
                 "in [findings.md](findings.md).",
    },
    {
        "module": "tower_levers",
        "title": "Image towers for the embedded run",
        "command": "python -m benchmarks.tower_levers [--steps N --tag T]",
        "about": "Each image tower (the 3-block ViT of 8-px patches, 4-px patches, open_clip's ModifiedResNet at "
                 "widths 8 and 16, dense and sparse) trained with the pipeline's own step on the embedded data; "
                 "zero-shot top-1 per concept family and image->text R@1 on the val split, against training "
                 "seconds. At the run's steps the ModifiedResNet of width 16 learns every family at least as "
                 "well as the ViT, most of all retrieval, which is why it is the embedded default; the paper's "
                 "presets keep their ViTs ([learning.md](learning.md)).",
    },
    {
        "module": "learning_levers",
        "title": "Learning levers: what holds the embedded CLIP back",
        "command": "python -m benchmarks.learning_levers [--only NAME --steps N --variant V --tag T]",
        "about": "Captions, hard-negative batches, optimiser, temperature, embedding width and steps, one change "
                 "at a time, each concept family's zero-shot and R@1 on the val split against training seconds. "
                 "Shape is limited by feature suppression and by steps, not by the tower; the long files train "
                 "3,024 steps. The reading is in [learning.md](learning.md).",
    },
    {
        "module": "linear_probe",
        "title": "What the image embedding holds: a linear probe",
        "command": "python -m benchmarks.linear_probe",
        "about": "A logistic-regression probe per concept family on the frozen, unit-norm image embeddings of "
                 "the committed models (fitted on train images, scored on the test split), beside zero-shot. A "
                 "family the probe cannot read is missing from the image side; one the probe reads but "
                 "zero-shot misses (count, size) is lost between the towers ([learning.md](learning.md)).",
    },
    {
        "module": "supervised_ceiling",
        "title": "What the image tower can learn when told: a supervised ceiling per family",
        "command": "python -m benchmarks.supervised_ceiling",
        "about": "The run's image tower (the embedded ModifiedResNet at 64 px, random init) and a linear "
                 "classifier trained with cross-entropy on one concept family's labels, a fresh tower per "
                 "family, scored on the val split. Every family the generator draws is learnable by this tower "
                 "in a few hundred steps -- position and the rendered word included, which no CLIP model here "
                 "puts in its image embedding -- so what zero-shot misses is what the captions do not teach, "
                 "not what the tower cannot see ([learning.md](learning.md)).",
    },
    {
        "module": "vlm_stage2",
        "title": "VLM stage 2: the whole LM against the top blocks",
        "command": "python -m benchmarks.vlm_stage2\n"
                   "python -m benchmarks.vlm_stage2 --only whole --set vlm.stage2_lr=2.0e-5",
        "about": "The `vlm` stage's 30 + 30 steps from the same seed on the committed `sparse` encoder, stage 2 "
                 "tuning the whole LM (the default, the paper's recipe), every block with the tied token "
                 "embeddings frozen, or the top 4 blocks, then held-out test images (4x the stage's 48). At this "
                 "scale (a few hundred question-answer pairs in stage 2; the paper tunes on 2.5M for 4 epochs) "
                 "tuning the whole LM answers worse on held-out images and the count answers collapse to one "
                 "constant (exact = chance); the tied embeddings are not the cause, and a lower learning rate "
                 "does not recover it. The embedded default follows the paper; `dvc exp run -S "
                 "vlm.lm_layers=4` gives the better toy VLM. A whole-LM step costs more only modestly since the "
                 "prompt pieces of a batch go through one embedding lookup (each lookup's backward wrote a dense "
                 "vocabulary x width gradient).",
    },
    {
        "module": "flickr8k_heads",
        "title": "Real photos: sparse heads on locked pretrained towers",
        "command": "python -m benchmarks.flickr8k_heads --workspace ../main-flickr8k",
        "about": "The projections and heads trained on the cached outputs of the locked EfficientNet-lite0 and "
                 "MiniLM towers of a Flickr8k workspace (`make pipeline-flickr8k STAGES=tower_cache`), one "
                 "setting at a time, scored on the test split: retrieval both ways, L0 and dead features. The "
                 "Flickr8k preset takes its caps and steps from this table ([real-photos.md](real-photos.md)).",
    },
    {
        "module": "tagging_ceiling",
        "title": "Real photos: how far tagging can go with the preset's towers and labels",
        "command": "python -m benchmarks.tagging_ceiling --workspace ../main-flickr8k",
        "about": "Two ceilings beside the preset models' tagging AUROC, per tag of the workspace's metrics stage. "
                 "The tower's probe: a logistic regression per tag on the locked EfficientNet-lite0's cached "
                 "features of the train photos, fitted to their caption labels and scored on the test photos: "
                 "what a linear read-out of the tower the models are built on reaches with these labels and "
                 "this much data. The captioners' agreement: whether one caption of a test photo uses the tag, "
                 "ranked by how many of the photo's other four do; where it is low, the word is the "
                 "captioner's choice rather than the image's. The two are not the same label (one caption "
                 "against any of five), so they bound different things.",
    },
    {
        "module": "flickr8k_preset",
        "title": "The Flickr8k preset, end to end",
        "command": "python -m benchmarks.flickr8k_preset --workspace ../main-flickr8k --wall-seconds <s>",
        "about": "The numbers of a finished `make pipeline-flickr8k` run collected into one file: per model "
                 "retrieval, tagging AUROC, L0 and dead features, Clarity; naming agreement from the atlas; how "
                 "long each stage took ([real-photos.md](real-photos.md)).",
    },
]

# Per result file: when and where it was measured, and what sets it apart from its siblings.
# ``tables``: for a list of rows (by its key, "rows" for a file that is a list), the columns to show,
# optionally as several views [(title, columns)]; a column ending in ".*" expands to every sub-key.
FILES: dict[str, dict[str, Any]] = {
    "flickr8k_preset.json": {
        "note": "The preset as committed (224 px, one VLM with a 300-step stage 0, tags filtered to words used "
                "mostly as nouns), 2 CPU cores, 2026-12-07. `against_dense`: each sparse model's recall minus dense's on the same test "
                "queries, with a 95% interval from a paired bootstrap over the 1,050 test photos.",
        "tables": {"against_dense": [
            (f"against dense, {k}", [f"image_retrieval_{k}.difference", f"image_retrieval_{k}.ci95_low",
                                     f"image_retrieval_{k}.ci95_high", f"text_retrieval_{k}.difference",
                                     f"text_retrieval_{k}.ci95_low", f"text_retrieval_{k}.ci95_high"])
            for k in ("r1", "r5", "r10")]},
    },
    "flickr8k_preset_128px.json": {"note": "The preset with photos at their own 128 px and two VLMs (sparse, "
                                           "dense), 2 CPU cores, 2026-12-07: below the 35% R@5 the heads reach "
                                           "at 224 px, so the preset moved to 224 px."},
    "train_throughput_cpu_tiny.json": {"note": "The embedded tiny model on 2 CPU cores."},
    "stage_startup_cpu.json": {"note": "Every stage, 3 repeats, on 2 CPU cores.", "names": {"stages": "stage"}},
    "conv_layout_cpu.json": {"note": "Batch 32, 3 repeats, one thread, 2026-12-07.",
                             "names": {"encoders": "encoder"}},
    "extract_throughput_cpu.json": {"note": "24,894 rows of `models/sparse`, 2 cores, 2026-12-01."},
    "sample_throughput_cpu.json": {
        "note": "50,000 records in five tars, 2026-12-01, on 2 cores shared with another test suite (load "
                "average 4-6): a second Ray task had no idle core to take, so Ray's map phase took about the "
                "same time at every task count.",
    },
    "sample_throughput_cpu_100k.json": {
        "note": "100,000 records in ten tars, a quiet machine, 2026-12-01, with the tar offsets in the refs.",
    },
    "sample_throughput_cpu_100k_before_offsets.json": {
        "note": "The same 100,000 records before the offsets: each worker kept an index of the last 8 tars it "
                "had scanned, a shard draws from every tar, so with 10 tars the index thrashed and tars were "
                "re-scanned for every shard.",
    },
    "sample_throughput_cpu_before_tar_index.json": {
        "note": "50,000 records before the per-process tar index (a more loaded hour): "
                "`WebDatasetSource.load` parsed every header of a source tar for each shard that drew from it.",
    },
    "metrics_scale_cpu.json": {
        "note": "After the fixes, 2 shared cores, 2026-12-01: rows 10k / 20k / 40k at width 55,296 and widths "
                "13,824 / 27,648 / 55,296 at 20k rows. The zero-shot rows were rerun after the last fix "
                "(`metrics_scale_cpu_zeroshot_blocked.json`).",
    },
    "metrics_scale_cpu_zeroshot_blocked.json": {"note": "The three zero-shot metrics rerun after the last fix."},
    "metrics_scale_cpu_before.json": {"note": "Before the fixes (`note` says how it was run)."},
    "metrics_scale_cpu_threads.json": {
        "note": "1 against 2 threads on the same 40k x 55,296 store, wall seconds (`speedup`). The 2-thread "
                "run of each image's top-k also used less CPU, so not all of its speed-up is the threads.",
    },
    "sparse_transport_gloo.json": {"note": "4 gloo workers on 2 shared cores; median of 3."},
    "loss_memory_cuda_full.json": {
        "note": "Global batch 32,768 = 128 x 256, fp32 tiles, one lent NVIDIA H200, 2026-11-23.",
    },
    "loss_memory_cpu_small.json": {"note": "The CPU preset: global batch 1,024, width 64 x 32 / 72 / 128."},
    "train_step_gpu.json": {"note": "One GPU on its own (median of 3 interleaved runs of 20 steps), one lent "
                                    "NVIDIA H200, 2026-11-23."},
    "train_step_gpu_global32768.json": {"note": "Rank 0 of a 32,768 global batch, one lent NVIDIA H200, "
                                                "2026-11-23."},
    "sparsity_tradeoff.json": {
        "note": "The embedded data, seed 0, with the earlier ViT tower (before 2026-12-03).",
    },
    "sparsity_tradeoff_flickr8k.json": {
        "note": "Flickr8k (36,280 train pairs, split by photo), the same tiny model at 64 px, two epochs, "
                "2026-12-01, ~2.5 min per setting. The knobs sparsify real photos as they do the embedded data "
                "but cost retrieval here: the tiny model learns little from 36k photos.",
    },
    "sparsity_tradeoff_one_object.json": {
        "note": "The same 41 concepts with one object per image, by params override: a test of the dead-feature "
                "account in [findings.md](findings.md).",
    },
    "tower_levers.json": {"note": "336 steps of 64 per setting, val split, 2 threads."},
    "tower_levers_pretrained.json": {
        "note": "The packaged ImageNet EfficientNet-lite0 at the data's 64 px, fine-tuned whole or with all but its "
                "last 3 groups locked, beside the default tower in the same run (`--only \"dense (default)\" --only "
                "EfficientNet --eval-every 56 --tag pretrained`). Not a from-scratch tower: a reference for what "
                "pretraining buys in the same steps (shape and retrieval) and costs (colour, size).",
    },
    "learning_levers.json": {"note": "336 steps of 64, dense, one change per setting, val split, 1 thread."},
    "learning_levers_long.json": {"note": "Dense, 3,024 steps (`--only baseline --steps 3024 --eval-every 504 "
                                          "--tag long`); the curve is in the plot."},
    "learning_levers_long_position_control.json": {
        "note": "Dense, 3,024 steps, 2 threads, the captions redrawn by the generator from each record's truth "
                "with a fresh seed (position named half the time, as in the data): the control for the next file."},
    "learning_levers_long_position.json": {
        "note": "Dense, 3,024 steps, 2 threads, the same redrawn captions with the main object's position "
                "always named: position 31% -> 70%, shape 79% -> 69% against the control."},
    "learning_levers_long_sparse.json": {
        "note": "`sparse` with the embedded knobs (head bias -0.5, head lr x10), cap 8, 3,024 steps. L0 keeps "
                "falling and some images end with no active feature, so R@1 cannot be scored.",
    },
    "learning_levers_long_sparse_paper_knobs_cap8.json": {"note": "`sparse` with the paper's heads (torch's bias "
                                                                  "init, head lr x1), cap 8, 3,024 steps."},
    "learning_levers_long_sparse_paper_knobs_cap20.json": {"note": "`sparse` with the paper's heads, cap 20, 3,024 "
                                                                   "steps (the long preset's `sparse`)."},
    "learning_levers_long_6048.json": {"note": "Dense, 6,048 steps, 2 threads (2026-12-08)."},
    "learning_levers_long_sparse_paper_knobs_cap20_6048.json": {"note": "`sparse` with the paper's heads, cap 20, "
                                                                        "6,048 steps, 2 threads (2026-12-08)."},
    "learning_levers_long_sparse_paper_knobs_cap50.json": {"note": "`sparse` with the paper's heads, cap 50, 3,024 "
                                                                   "steps."},
    "flickr8k_heads.json": {"note": "Steps of 256 per setting on the cached towers (700 unless the name says), "
                                    "2026-12-07; `split`: where retrieval is scored (rows without one: test; "
                                    "without a seed: seed 0). `seed_spread`: settings run with seeds 0-2, mean and "
                                    "standard deviation (\"(val)\": on the val split). At the preset's 700 steps "
                                    "sparse text R@5 is 2.7 points under dense; both overtrain there: at 350 steps "
                                    "dense gains 4.7 points on test and sparse 2.9, at L0 7.5 / 11% (3.0 / 5.0% at "
                                    "700). Tagging AUROC (the workspace's 50 tags) rises with them. The "
                                    "`*_text2_350` rows (2026-12-08, a fresh workspace, seed 0) train MiniLM's "
                                    "last two layers too, from their own "
                                    "cache: dense gains 4-5 points of R@5, sparse 2 on image retrieval and none on "
                                    "text."},
    "tagging_ceiling.json": {"note": "The Flickr8k preset's workspace of 2026-12-07 (lite0 at 224 px, MiniLM), "
                                     "the probe at C = 1 (C from 0.3 to 10 gives a mean of 0.844 to 0.855).",
                             "names": {"per_tag": "tag"}},
    "linear_probe.json": {"note": "The committed embedded run's models (336 steps).", "tables": PROBE_TABLES},
    "linear_probe_long.json": {"note": "The long pipeline's models (`deploy/params.long.yaml`, 3,024 steps; "
                                       "`cd ../main-long && python -m benchmarks.linear_probe --tag long`).",
                               "tables": PROBE_TABLES},
    "supervised_ceiling.json": {"note": "400 steps of 64 per family, lr 1e-3, 2 threads, 2026-12-08.",
                                "tables": {"families": [(None, ["family", "classes", "train_images", "val_images",
                                                                "chance", "final"])]}},
    "vlm_stage2_cpu.json": {"note": "Stage 2 at the default learning rate."},
    "vlm_stage2_cpu_lr2e-5.json": {"note": "The whole LM at a lower stage-2 learning rate."},
}

# Tables shown by default are every column; these keep the wide ones readable.
COLUMNS: dict[str, dict[str, list[str]]] = {
    "sample_throughput": {"runs": ["path", "tasks", "task_cpus", "cores", "seconds", "records_per_s",
                                   "records_per_s_per_core", "vs_plain_stream", "paper_15m_hours.*"]},
    "metrics_scale": {
        "rows": ["metric", "rows", "width", "threads", "status", "cpu_seconds", "seconds", "peak_extra_gib",
                 "peak_rss_gib"],
        "fits": ["cpu_seconds_vs_rows", "cpu_seconds_vs_width", "peak_extra_gib_vs_rows", "peak_extra_gib_vs_width",
                 "extrapolated_cpu_seconds", "extrapolated_peak_extra_gib_linear"],
    },
    "sparse_transport": {"rows": ["density", "dense_s", "sparse_s", "sparse_over_dense_time", "dense_bytes",
                                  "sparse_bytes", "all_gather_s", "step_dense_s", "step_sparse_s",
                                  "step_sparse_bytes"]},
    "train_step_gpu": {"rows": ["arch", "loss", "expansion", "width", "workers", "status", "samples_per_s",
                                "throughput_vs_dense", "net_step_ms", "peak_memory_gib", "memory_vs_dense",
                                "parameters_m"]},
    "sparsity_tradeoff": {"rows": ["setting", "variant", "steps", "l0_image_pct", "l0_text_pct", "dead_image",
                                   "dead_text", "colour_top1", "image_r5", "text_r5", "logit_scale", "seconds"]},
    "tower_levers": {"settings": ["setting", "variant", "steps", "final.seconds", "final.shape", "final.colour",
                                  "final.size", "final.position", "final.background", "final.count", "final.word",
                                  "final.image_r1", "final.l0_image_pct"]},
    "learning_levers": {"settings": ["setting", "variant", "steps", "final.seconds", "final.shape", "final.colour",
                                     "final.size", "final.position", "final.background", "final.count",
                                     "final.word", "final.image_r1", "final.l0_image_pct"]},
    "vlm_stage2": {"rows": ["setting", "lm_layers", "stage2_lr", "train_seconds", "final_loss", "lm_trained_mb",
                            "eval_images", "colour.exact", "colour.chance", "count.exact", "count.chance",
                            "subject.exact", "subject.chance", "text.exact", "text.chance"]},
    "flickr8k_heads": {"rows": ["setting", "split", "seed", "width", "logit_scale_cap", "steps", "image_retrieval_r5",
                                "text_retrieval_r5", "image_retrieval_r10", "text_retrieval_r10", "l0_image_pct",
                                "l0_text_pct", "dead_pct", "logit_scale", "seconds"]},
}
SKIP_FIELDS = {"worker_imports"}  # a temporary path of the run, not a measurement

# Result files that are not JSON: linked at the end with what they hold.
OTHER_FILES: dict[str, str] = {
    "gpu_tests.xml": "`pytest -m gpu` on one lent H200: the tiled loss equals open_clip's on CUDA (value and "
                     "gradients, 16 simulated workers, width 16,384); Ray Train trains Sparse CLIP with "
                     "`train.use_gpu: true` in bf16 autocast with either loss, its process group on NCCL. One GPU "
                     "holds one NCCL rank, so no NCCL collective ran: the multi-worker ring is proven on gloo.",
    "gpu_tests.log": "the log of `gpu_tests.xml`",
    "gpu_tests_rerun.xml": "the CUDA and tiled cases again, after the test also checked that the weights moved",
    "gpu_tests_rerun.log": "the log of `gpu_tests_rerun.xml`",
    "gpu_loss.log": "the log of `bash benchmarks/gpu.sh loss` (`loss_memory_cuda_full.json`)",
    "gpu_step.log": "the log of `bash benchmarks/gpu.sh step` (`train_step_gpu.json`)",
    "gpu_step-global.log": "the log of `bash benchmarks/gpu.sh step-global` (`train_step_gpu_global32768.json`)",
}

HEADER = """\
# Benchmarks

<!-- Generated by `python -m benchmarks.tables` from benchmarks/results/*.json; do not edit by hand.
     tests/test_docs.py fails when this file is stale. -->

What was measured, where, and how to rerun it. Every number in a table below is read from the
result file named above it (`benchmarks/results/`); the prose says what a benchmark measures and
what its numbers say. Every ratio is measured side by side in one run. A rerun rewrites its JSON;
then `python -m benchmarks.tables` rewrites this page. Fractions are shown as stored (0.25 is
25%); `_pct` columns are percentages.
"""


# --------------------------------------------------------------------------- formatting


def number(value: Any) -> str:
    """A cell: integers with thousands separators, floats to 3 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 999.5:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, list):
        if len(value) > LIST_CELL_MAX or any(isinstance(v, (dict, list)) for v in value):
            return f"{len(value)} values"
        return ", ".join(number(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "))
    return " ".join(str(value).split())


def cell(value: Any) -> str:
    return number(value).replace("|", "\\|").replace("<", "&lt;")


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of dicts (curves) are left out."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            continue
        else:
            flat[name] = value
    return flat


def select(rows: list[dict[str, Any]], columns: list[str] | None) -> list[str]:
    """The columns to show: ``columns`` (``key.*`` expanded) where given, else every key in order."""
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row))
    if not columns:
        return list(present)
    chosen: list[str] = []
    for column in columns:
        if column.endswith(".*"):
            chosen += [key for key in present if key.startswith(column[:-1])]
        elif column in present:
            chosen.append(column)
    return chosen


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    flat = [flatten(row) for row in rows]
    keys = select(flat, columns)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in flat]
    return lines + [""]


def prose(text: str) -> list[str]:
    """Hand-written paragraphs wrapped at 100 columns, each followed by a blank line."""
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        lines += textwrap.wrap(paragraph, 100, break_long_words=False, break_on_hyphens=False) + [""]
    return lines


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^a-z0-9_\- ]", "", title.lower()).replace(" ", "-")


# --------------------------------------------------------------------------- one result file


def benchmark_of(name: str) -> str | None:
    """The benchmark module a result file belongs to: the longest module name its stem starts with."""
    modules = sorted((b["module"] for b in BENCHMARKS), key=len, reverse=True)
    return next((m for m in modules if name.startswith(m)), None)


def file_section(path: Path, module: str | None) -> list[str]:
    data = json.loads(path.read_text())
    spec = FILES.get(path.name, {})
    out = [f"### `{path.name}`", ""]
    if note := spec.get("note"):
        out += prose(note)
    elif path.name not in FILES:
        out += ["(Not described yet in `benchmarks/tables.py`.)", ""]
    if isinstance(data, dict) and (command := data.get("command")):
        out += [f"Command: `{command}`", ""]
    columns = COLUMNS.get(module or "", {})
    views = spec.get("tables", {})
    if isinstance(data, list):
        data = {"rows": data}
    scalars: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    tables: list[tuple[str, list[dict[str, Any]], str | None]] = []  # key, rows, the rows' name column
    for key, value in data.items():
        if key in SKIP_FIELDS or key == "command":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value, None))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            name = spec.get("names", {}).get(key, "name")
            tables.append((key, [{name: sub, **flatten(v)} for sub, v in value.items()], name))
        elif key in MACHINE_KEYS:
            if value is not None:
                machine.update(flatten(value if key == "machine" else {key: value}) if isinstance(value, dict)
                               else {"": value} if key == "machine" else {key: value})
        else:
            scalars.update(flatten({key: value}) if isinstance(value, dict) and value else {key: value})
    if machine:
        out += ["Machine: " + ", ".join(f"{key} {cell(value)}".strip() for key, value in machine.items()) + ".", ""]
    if scalars:
        out += ["| field | value |", "|---|---|"]
        out += [f"| {key} | {cell(value)} |" for key, value in scalars.items()] + [""]
    for key, rows, name in tables:
        for title, cols in views.get(key, [(None, None)]):
            label = title or (key if len(tables) > 1 or key != "rows" else None)
            if label:
                out += [f"*{label}*", ""]
            cols = cols or columns.get(key)
            out += table(rows, [name, *cols] if cols and name else cols)
    if path.name == "train_step_gpu_global32768.json":
        out += prose("*The largest expansion that fits* (`python -m benchmarks.fit_table`: a line through the "
                     f"measured peaks of each row; {fit_table.MARGIN_GIB:g} GiB of each card kept free for the CUDA "
                     "context and the allocator's cache; \"forecast\" = outside the measured expansions):")
        out += [fit_table.table(data).rstrip(), ""]
    plot = path.with_suffix(".png")
    if plot.is_file():
        out += [f"![{path.stem}]({LINK}/{plot.name})", ""]
    return out


# --------------------------------------------------------------------------- the page


def junit(path: Path) -> str:
    """A pytest JUnit XML file's counts, read from it: ' (3 tests: 3 passed)'."""
    if path.suffix != ".xml":
        return ""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return ""
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    parts = [f"{passed} passed"] + [f"{counts[k]} {k}" for k in ("failures", "errors", "skipped") if counts[k]]
    return f" ({counts['tests']} tests: {', '.join(parts)})"


def render(results: Path = RESULTS) -> str:
    """The whole of docs/benchmarks.md from the JSON files in ``results``."""
    files = sorted(results.glob("*.json"))
    groups: dict[str | None, list[Path]] = {}
    for path in files:
        groups.setdefault(benchmark_of(path.stem), []).append(path)
    known = [b for b in BENCHMARKS if b["module"] in groups]
    out = [HEADER, "| benchmark | result files | command |", "|---|---|---|"]
    for bench in known:
        names = ", ".join(f"`{p.name}`" for p in groups[bench["module"]])
        first = bench["command"].splitlines()[0].split("#")[0].strip()
        out.append(f"| [{bench['title']}](#{anchor(bench['title'])}) | {names} | `{first}` |")
    out.append("")
    for bench in known:
        out += [f"## {bench['title']}", "", *prose(bench["about"]),
                "```bash", bench["command"], "```", ""]
        for path in groups[bench["module"]]:
            out += file_section(path, bench["module"])
    if None in groups:
        out += ["## Other results", ""]
        for path in groups[None]:
            out += file_section(path, None)
    jsons = {p.stem for p in files}
    others = sorted(p for p in results.iterdir()
                    if p.is_file() and p.suffix != ".json" and not (p.suffix == ".png" and p.stem in jsons))
    if others:
        out += ["## Other files in `benchmarks/results/`", "",
                "Produced by `bash benchmarks/gpu.sh tests loss step step-global` on a GPU machine.", ""]
        out += [f"- [`{p.name}`]({LINK}/{p.name}): {OTHER_FILES.get(p.name, 'not described yet')}{junit(p)}"
                for p in others]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    return generated_page.main("python -m benchmarks.tables", __doc__.splitlines()[0], DOC, render, argv)


if __name__ == "__main__":
    raise SystemExit(main())
