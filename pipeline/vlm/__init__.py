"""A VLM on the sparse encoder (paper §4, Tab 3, Fig 8): frozen Sparse CLIP image features ->
2-layer MLP adapter -> a causal LM, trained in two stages, evaluated on question answering, and
steered by editing named sparse features.

- :mod:`.language_model`: the LM (a local Hugging Face folder, or SmolLM2-135M-Instruct from
  its registry package), cached as a plain HF folder;
- :mod:`.questions`: question-answer pairs from ground truth (or a JSONL file);
- :mod:`.model`: the VLM itself, feature edits included; :mod:`.train`: the Ray Train loop;
- :mod:`.evaluate`: QA accuracy; :mod:`.steering`: the steering API, CLI and evaluation.
"""
