"""Image-caption data, from a source to model inputs (the ``sample`` stage and every reader of
its output).

==================  ==================================================================
:mod:`.sources`     where pairs come from: the embedded generator, CSV, webdataset, parquet
:mod:`.concepts`    the synthetic dataset's concept vocabulary (shapes, colours, words)
:mod:`.generator`   its deterministic renderer, with per-object ground truth
:mod:`.records`     one image-caption record and its validation
:mod:`.sampling`    the sample stage: a seeded subset, validated, written as split shards
:mod:`.shards`      webdataset tar shards and the manifest that lists them (sha256 each)
:mod:`.evalsets`    zero-shot tasks, retrieval sets and box crops derived from val/test
:mod:`.loading`     shards -> decoded, tokenised arrays, alike for training and evaluation
==================  ==================================================================
"""
