"""Out of fedlora, into the Hugging Face world: ``fedlora export RUN_DIR ...``.

- :func:`export_merged`: the base model with the run's global adapter (and, for FedEx-LoRA and
  FLoRA, its merged base change) folded in: a standalone Hugging Face model folder, with the
  tokenizer and a model card, that ``AutoModelFor….from_pretrained`` loads with nothing from fedlora.
- :func:`export_adapter`: the global adapter in PEFT format with a complete model card
  (``README.md``), ready for ``push_to_hub``.
- :func:`export_client_adapter`: one client's own adapter (strategies with personal state: FedSA,
  SFed), in PEFT format.

Modules: ``exports`` (the three exports and the run they read), ``model_card`` (the README.md),
``cli`` (the command).
"""

__all__ = ["ExportedRun", "export_adapter", "export_client_adapter", "export_merged"]


def __getattr__(name: str):
    """The exports load torch and transformers on first use: ``fedlora --help`` imports ``cli`` only."""
    if name in __all__:
        from fedlora.export import exports

        return getattr(exports, name)
    raise AttributeError(f"module 'fedlora.export' has no attribute {name!r}")
