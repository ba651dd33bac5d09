"""Parameters of the stages after training: vocabulary, reference, extraction, metrics, SAE,
atlas, VLM, steering, report and the ablation sweep."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.config.base import OutputDir, Section, SharedDir
from pipeline.config.training import WorkerGroupParams

# --------------------------------------------------------------------------- analysis stages


class VocabParams(Section):
    """The naming vocabulary (paper §3.2) and the SBERT sample for the text C-score."""

    source: Literal["builtin", "file"] = Field("builtin", description="builtin: WordNet + common words + concepts")
    path: str | None = Field(None, description="source=file: one word per line")
    common_words: int = Field(20000, ge=0, description="most frequent English words merged in (wordfreq)")
    max_words: int | None = Field(None, ge=1, description="cap on the vocabulary size (None: all)")
    cscore_words: int = Field(10000, ge=2, description="words embedded with SBERT for the C-score")
    seed: int = Field(0, ge=0)
    out_dir: OutputDir = "data/vocab"

    @model_validator(mode="after")
    def _path_for_file(self) -> VocabParams:
        if self.source == "file" and not self.path:
            raise ValueError("vocab.source=file needs vocab.path")
        return self


class ReferenceParams(Section):
    """The dense image encoder Clarity is measured with (the paper: OpenAI CLIP, not offline)."""

    encoder: Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "open_clip"] = "efficientnet-lite0"
    arch: str | None = Field(None, description="encoder=open_clip: config name")
    checkpoint: str | None = Field(None, description="encoder=open_clip: local weights")
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(64, ge=1)
    out_dir: OutputDir = "activations/reference"

    @model_validator(mode="after")
    def _open_clip_needs_weights(self) -> ReferenceParams:
        if self.encoder == "open_clip" and not (self.arch and self.checkpoint):
            raise ValueError("reference.encoder=open_clip needs arch and checkpoint (random weights mean nothing)")
        return self


class ExtractParams(Section):
    """Ray Data extraction of sparse activations (images, captions, vocabulary, eval sets)."""

    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"], min_length=1)
    batch_size: int = Field(128, ge=1)
    actors: int = Field(2, ge=1, description="Ray Data actors, each with a model loaded once")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU actors)")
    token_sample: int = Field(64, ge=0, description="test images whose per-token activations are kept")
    evolution_vocab: int = Field(2000, ge=0, description="vocabulary head encoded at each evolution snapshot "
                                 "(with the test images and captions); 0: no evolution sets")
    labelled_folders: dict[str, str] = Field(default_factory=dict,
                                             description="name -> folder of class-named subfolders (ImageNet layout)")
    out_dir: OutputDir = "activations"


class MetricsParams(Section):
    """The metrics stage: Clarity's tau and n_min (the paper's Eq. 2), the text C-score's activation
    thresholds, the top-k cuts of zero-shot, the AUROC at which one feature counts as a concept's
    detector (``mono_auroc``), the precision at which the images a feature fires on count as one
    concept's (``mono_precision``), open-vocabulary tagging and threads."""

    clarity_tau: float = Field(0.001, ge=0)
    n_min: int = Field(2, ge=2)
    cscore_thresholds: list[float] = Field([0.0, 0.5, 1.0, 1.5], min_length=1)
    topk: list[int] = Field([1, 2, 4, 8, 16, 32], description="zero-shot with each image's top-k features")
    mono_auroc: float = Field(0.9, gt=0.5, le=1.0)
    mono_precision: float = Field(0.9, gt=0.5, le=1.0, description="concept recovery: a feature is precise when "
                                  "this share of the images it fires on hold a concept, and a concept is covered by "
                                  "its precise features when together they fire on this share of its images")
    precise_min_images: int = Field(10, ge=1, description="concept recovery: a feature is judged on its precision "
                                    "when it fires on at least this many images")
    tag_words: int = Field(50, ge=0, description="open-vocabulary tagging: the most frequent caption nouns scored on "
                           "the test images (0: off)")
    tag_min_images: int = Field(10, ge=1, description="tagging: a noun tags at least this many test images")
    threads: int | None = Field(None, ge=1, description="threads for the row blocks of Clarity, zero-shot and "
                                "top-k (None: one per core); the numbers do not depend on it")
    out_dir: OutputDir = "metrics"


class SAEParams(Section):
    """The post-hoc SAE baseline (the SAE supplementary's recipe: BatchTopK, expansion 32, K = 30)."""

    source_variant: str = Field("dense", description="the train.variants entry whose embeddings the SAE reads")
    kind: Literal["batchtopk", "topk", "relu"] = "batchtopk"
    expansion: int = Field(32, ge=1)
    k: int = Field(30, ge=1)
    l1_lambda: float = Field(0.0, ge=0, description="kind=relu: L1 weight")
    lr: float = Field(4e-4, gt=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4096, ge=2)
    aux_k: int = Field(512, ge=1, description="AuxK: dead features used to model the residual")
    dead_after_tokens: int = Field(20480, ge=1)
    log_every: int = Field(100, ge=1)
    train_splits: list[Literal["train", "val", "test"]] = Field(["train"], min_length=1)
    multimodal: bool = Field(True, description="also train one SAE on the image and caption embeddings together "
                             "(Papadimitriou et al.'s setting, which the paper contrasts in §3.1)")
    residual_layer: int | None = Field(None, ge=0, description="also train an SAE on the vision tower's residual "
                                       "tokens after this block (0-based; the SAE supplementary's setting); None: off")
    tokens_per_image: int = Field(4, ge=1, description="random patch tokens per training image (the supplementary: 4)")
    include_cls: bool = Field(True, description="add each training image's CLS token to its patch tokens")
    cls_layer: int | None = Field(-2, description="also train the paper's SAE baseline: an SAE on the CLS token of the "
                                  "vision tower after this block (Prisma's cls@11 of 12 blocks: -2, the last but one; "
                                  "negative counts from the end), scored with the variants' metrics; None: off")
    outlier_quantile: float = Field(0.99, gt=0, lt=1, description="outlier rows: norm above this quantile of "
                                    "the evaluated rows' norms (the supplementary picks its tau from that distribution)")
    cache_data: bool = Field(True, description="read the training embeddings once (false: stream every epoch)")
    device: str = Field("auto", description="auto: cuda when available")
    out_dir: OutputDir = "activations/sae"

    @model_validator(mode="after")
    def _relu_needs_l1(self) -> SAEParams:
        if self.kind == "relu" and self.l1_lambda == 0:
            raise ValueError("sae.kind=relu needs sae.l1_lambda > 0")
        return self


class AtlasParams(Section):
    """Concept naming, feature evolution, heatmaps and the HTML feature atlas."""

    variants: list[str] | None = Field(None, description="models to map (None: every train.variants entry)")
    top_words: int = Field(10, ge=1, description="vocabulary words kept per feature")
    min_word_count: int = Field(5, ge=0, description="name with words the training captions use this often "
                                "(0: the whole vocabulary, as the paper's web-scale model)")
    top_images: int = Field(8, ge=1, description="images kept per feature")
    grid_features: int = Field(12, ge=1, description="rows of the Fig 4 feature grid")
    evolution_features: int = Field(6, ge=1, description="rows of the Fig 5 evolution strip")
    heatmap_images: int = Field(6, ge=1, description="rows of the heatmap panel")
    heatmap_models: list[str] = Field(["sparse_avg", "sparse"], description="models drawn side by side in the "
                                      "heatmap panel (avg vs cls pooling); those not mapped are left out")
    out_dir: OutputDir = "reports/atlas"


class VLMParams(WorkerGroupParams):
    """The VLM on a frozen encoder (paper §4): adapter + LM, two-stage training, QA evaluation."""

    variants: list[str] = Field(["sparse_plus", "dense"], min_length=1, description="encoders to build a VLM on")
    language_model: str = Field("smollm2-135m-instruct", description="smollm2-135m-instruct (packaged) or a local "
                                "Hugging Face model folder, e.g. Llama-3.1-8B-Instruct")
    lm_cache: SharedDir = Field(".cache/lm", description="where the packaged GGUF model is converted to, once")
    features: Literal["pooled", "tokens"] = Field("pooled", description="pooled embedding (1 visual token) or "
                                                  "every spatial token's sparse features")
    adapter_hidden: int = Field(1024, ge=1)
    question_types: list[str] = Field(["subject", "colour", "count", "text"], min_length=1)
    qa_path: str | None = Field(None, description="JSONL {key, type, question, answer} instead of ground truth")
    stage0_steps: int = Field(0, ge=0, description="before the two stages, the adapter alone learns to put each "
                              "image's visual token where the LM embeds its answers' words (mean squared error, "
                              "no LM pass: seconds); 0: off, the paper's two stages only")
    stage0_lr: float = Field(1e-3, gt=0)
    stage1_steps: int = Field(40, ge=0, description="adapter only")
    stage2_steps: int = Field(40, ge=0, description="adapter + LM top lm_layers blocks")
    stage1_lr: float = Field(1e-3, gt=0)
    stage2_lr: float = Field(5e-5, gt=0)
    lm_layers: int | None = Field(None, ge=0, description="LM blocks trained in stage 2, from the top (None: the "
                                  "whole LM, the paper's 'adapter and LLM together'; a number saves memory and time)")
    batch_size: int = Field(16, ge=1)
    answer_balance: float = Field(0.0, ge=0.0, le=1.0, description="draw each training example with weight (its "
                                  "answer's count within its question type) ^ -answer_balance: 0 uniform, 1 every "
                                  "answer of a type equally often (the question types keep their shares); for answers "
                                  "as skewed as Flickr8k's subjects, where the VLM can settle on the commonest")
    log_every: int = Field(5, ge=1)
    train_images: int | None = Field(None, ge=1, description="training photos decoded for the VLM (None: the "
                                     "whole train split; each is held in memory at the encoder's input size)")
    eval_images: int = Field(64, ge=1, description="held-out test images for QA evaluation")
    eval_batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    out_dir: OutputDir = "vlm"


class SteerParams(Section):
    """Steering evaluation (Fig 8b): suppress the true label's features, boost another label's."""

    variant: str = Field("sparse_plus", description="whose VLM is steered (one of vlm.variants; the paper's: Sparse+)")
    question_types: list[Literal["subject", "colour", "count", "text"]] = Field(
        ["colour", "subject"], min_length=1, description="questions asked, each steered on its own answers as "
        "labels (subject: the paper's question)")
    ks: list[int] = Field([1, 2, 4, 16], min_length=1, description="features per concept word (K)")
    strengths: list[float] = Field([2.0, 5.0], min_length=1, description="steering strengths (SS)")
    images: int = Field(96, ge=1, description="test images (each cell's rates carry a 95% interval)")
    max_new_tokens: int = Field(24, ge=1, description="tokens every steering answer may run to: several times "
                                "vlm.max_new_tokens, so that abnormally long (corrupted) answers can show")
    max_words: int | None = Field(None, ge=1, description="an answer with more words is corrupted; None: the "
                                  "corruption_quantile of the unedited answers' own word counts")
    corruption_quantile: float = Field(0.99, gt=0.0, le=1.0)
    out_dir: OutputDir = "metrics"


class ReportParams(Section):
    """The comparison report (``reports/comparison``): paper-shaped tables and overlaid training
    curves. By default the latest FINISHED run of each stage and variant in the experiment."""

    experiment: str | None = Field(None, description="MLflow experiment to read (None: project.experiment)")
    runs: list[str] = Field(default_factory=list, description="MLflow run ids to compare instead")
    dvc_exps: list[str] = Field(default_factory=list, description="DVC experiments to compare instead "
                                "(names or revs; their stage runs carry the tag dvc_exp)")
    out_dir: OutputDir = "reports/comparison"
    claims_file: OutputDir = Field("reports/claims.json", description="the verdicts on the paper's claims of the "
                                   "first source compared, as a DVC metrics file (`dvc metrics diff` shows a flip); "
                                   "outside metrics/, which the report reads as a whole")

    @model_validator(mode="after")
    def _one_source(self) -> ReportParams:
        if self.runs and self.dvc_exps:
            raise ValueError("give runs or dvc_exps, not both")
        return self


class AblationParams(Section):
    """The paper's small-scale ablation (Fig 2a-c, :mod:`pipeline.clip.ablation`): many short in-process
    trainings of the base ``train.model`` / ``train.optim``, each panel varying one choice."""

    steps: int = Field(300, ge=1, description="training steps per point")
    batch_size: int = Field(128, ge=2)
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="every point is trained once per seed")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    val_images: int = Field(500, ge=1, description="val images scored at each eval")
    expansions: list[int] = Field([1, 2, 4, 8, 16, 32], description="Fig 2a: head widths (x embed_dim); [] skips it")
    expansion_activations: list[Literal["relu", "none"]] = Field(["relu", "none"], description="Fig 2a: lines")
    activations: list[Literal["relu", "topk", "l1"]] = Field(["relu", "topk", "l1"],
                                                             description="Fig 2b: sparsity methods; [] skips it")
    scale_caps: list[float] = Field([2, 4, 6, 8, 10, 12, 100], description="Fig 2c: logit scale caps; [] skips "
                                    "it (pick caps that bind: a cap above the scale the run learns changes nothing)")
    recipes: list[Literal["paper", "embedded"]] = Field(
        ["paper", "embedded"], min_length=1, description="the knobs every point trains with, each its own line: "
        "paper (heads at torch's init and the towers' lr) or embedded (train.model's head_bias_init and "
        "train.optim's head_lr_multiplier), TopK included either way")
    scale_mode: Literal["learnable", "fixed"] = Field(
        "learnable", description="Fig 2c: the paper's learnable scale under each cap, or a scale fixed at it")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per point (a Ray task); points run side by side")
    threads_per_task: int = Field(1, ge=1, description="torch threads inside each point")
    use_gpu: bool = Field(False, description="one GPU per point (task_cpus then also applies)")
    out_dir: OutputDir = "plots/ablation"

    @model_validator(mode="after")
    def _something_to_run(self) -> AblationParams:
        if not (self.expansions or self.activations or self.scale_caps):
            raise ValueError("ablation: expansions, activations and scale_caps are all empty")
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"ablation.expansions must be >= 1 (1 = the embed_dim itself), got {self.expansions}")
        if any(c <= 1 for c in self.scale_caps):
            raise ValueError(f"ablation.scale_caps must be > 1, got {self.scale_caps}")
        return self


