"""The model card (``README.md``) of an export: Hugging Face metadata (``huggingface_hub``'s
:class:`~huggingface_hub.ModelCardData`) and a body that says what was trained, how, on what, and
how well: method, rounds, clients and partition, data, final metrics, and the fedlora version.
Every number is read from the run's own summary.json and config.toml."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.files import atomic_write

if TYPE_CHECKING:
    from fedlora.export.exports import ExportedRun

#: the Hub pipeline tag of each PEFT task type
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation"}

#: the papers of the methods, for the card's "Method" line
METHOD_NAMES = {
    "fedit": "FedIT (FedAvg of A and B)", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA", "sfed": "SFed-LoRA",
    "rolora": "RoLoRA", "flexlora": "FlexLoRA", "flora": "FLoRA", "fedex": "FedEx-LoRA", "fedsvd": "FedSVD",
    "svd": "SVD redistribution", "lorafair": "LoRA-FAIR", "fedrot": "FedRot-LoRA", "subspace": "Subspace-Reg",
}

KINDS = {
    "merged": "the base model with the federation's global LoRA adapter merged into its weights",
    "adapter": "the federation's global LoRA adapter (PEFT format)",
    "client": "one client's own LoRA adapter (PEFT format): the shared factors with its personal ones",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def auto_class(architecture: str) -> str:
    """The ``transformers`` Auto class that loads a model of ``architecture`` (``BertForSequenceClassification``)."""
    for head in ("ForSequenceClassification", "ForCausalLM", "ForMultipleChoice"):
        if architecture.endswith(head):
            return f"AutoModel{head}"
    return "AutoModel"


def card_text(run: ExportedRun, *, kind: str, base_model: str, client: int | None = None,
              architecture: str = "") -> str:
    """The card's text: YAML metadata, then the body. ``architecture``: the merged model's class."""
    from huggingface_hub import ModelCardData

    import fedlora

    cfg, summary = run.cfg, run.summary
    task_type = run.adapter_config.get("task_type", "")
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers" if kind == "merged" else "peft",
        pipeline_tag=PIPELINE_TAGS.get(task_type),
        tags=["fedlora", "federated-learning", "lora", cfg.strategy.name]
             + ([] if kind == "merged" else ["base_model:adapter:" + base_model]),
    )
    metric = summary.get("metric", "accuracy")
    method = METHOD_NAMES.get(cfg.strategy.name, cfg.strategy.name)
    options = ", ".join(f"{k} = {v!r}" for k, v in sorted(cfg.strategy.options.items())) or "defaults"
    per_round = (f"{cfg.train.clients_per_round} sampled" if cfg.train.clients_per_round else
                 "all" if cfg.train.client_fraction == 1 else f"a fraction {cfg.train.client_fraction:g} sampled")
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {cfg.run.name}: {method}, federated LoRA on {cfg.data.source}" + (f" (client {client})" if client is not None else ""),
        "",
        f"This folder holds {KINDS[kind]}, trained with fedlora "
        f"{fedlora.__version__}.",
        "",
        "## Training",
        "",
        "| | |", "|---|---|",
        f"| Method | {method} (`strategy.name = {cfg.strategy.name!r}`; options: {options}) |",
        f"| Base model | {base_model} |",
        f"| LoRA | rank {cfg.lora.r}, alpha {cfg.lora.alpha:g}, target modules {', '.join(run.adapter_config.get('target_modules') or cfg.lora.target_modules)} |",
        f"| Data | {cfg.data.source} (task {cfg.data.task}, max length {cfg.data.max_length}) |",
        f"| Clients | {summary.get('num_clients')} ({cfg.partition.method} partition"
        + (f", α = {cfg.partition.alpha:g}" if cfg.partition.method == "dirichlet" else "") + f"), {per_round} per round |",
        f"| Rounds | {summary.get('rounds_completed')} of {summary.get('rounds')} (status: {summary.get('status')}) |",
        f"| Local training | {cfg.train.local_steps if not cfg.train.local_epochs else str(cfg.train.local_epochs) + ' epochs'}"
        f"{' steps' if not cfg.train.local_epochs else ''} per round, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g} |",
        f"| Seed | {cfg.run.seed} |",
        "",
        "## Results",
        "",
        f"On the global validation subset ({cfg.data.eval_examples or 'all'} examples), after the last round:",
        "",
        "| metric | final | best |", "|---|---|---|",
        f"| global {metric} | {_fmt(summary.get(f'final_{metric}'))} | {_fmt(summary.get(f'best_{metric}'))} |",
    ]
    if summary.get(f"final_personal_{metric}_weighted") is not None:
        lines.append(f"| personal {metric} (weighted over clients) | "
                     f"{_fmt(summary.get(f'final_personal_{metric}_weighted'))} | "
                     f"{_fmt(summary.get(f'best_personal_{metric}_weighted'))} |")
    if summary.get("mean_agg_error_rel") is not None:
        lines.append(f"| mean relative aggregation error | {_fmt(summary['mean_agg_error_rel'])} | |")
    if kind == "client":
        lines += ["", f"The table is the federation's; this is client {client}'s personal model, evaluated in the "
                      "run's personal metrics (`metrics.jsonl`, `eval.personal.per_client`)."]
    lines += ["", "## Use", "", "```python"]
    if kind == "merged":
        auto = auto_class(architecture)
        lines += [f"from transformers import {auto}, AutoTokenizer", "",
                  f"model = {auto}.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)"]
    else:
        lines += ["from peft import PeftModel", "",
                  f"base = ...  # {base_model}, loaded with the task's AutoModel class",
                  "model = PeftModel.from_pretrained(base, PATH)"]
    lines += ["```", "", "To continue federated training from this adapter: `fedlora run --set lora.init_adapter=PATH`."
              if kind != "merged" else "To fine-tune further with fedlora: `fedlora run --set model.name=PATH`.", ""]
    from fedlora.assets.catalog import CATALOG

    entry = CATALOG.get(cfg.model.name)
    if entry is not None:
        lines += [f"The base model came from fedlora's offline catalog ({entry.name}: {entry.title}; {entry.terms}).", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, run: ExportedRun, *, kind: str, base_model: str, client: int | None = None,
                     architecture: str = "") -> Path:
    return atomic_write(Path(folder) / "README.md", card_text(run, kind=kind, base_model=base_model, client=client,
                                                              architecture=architecture))
