"""One shared frozen base model with PEFT LoRA, and the adapter moves the engine makes on it.

Every simulated client uses the same model object: a client's round starts by copying its start
adapter into the LoRA parameters (a direct tensor copy, no state-dict round trip) and setting its
scaling in each LoRA layer's ``scaling[adapter_name]``. Memory is one base model plus one PEFT
adapter per distinct LoRA rank (heterogeneous ranks: ``add_adapter`` / ``set_adapter``), whatever
the number of clients.

PEFT key names (``base_model.model.<module>.lora_A.weight``, ``base_model.model.classifier.weight``)
are the names :class:`~fedlora.factors.Adapter` uses, so adapters move between the engine, the
strategies and ``save_pretrained``-format files unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair

DEFAULT_ADAPTER = "default"

#: Target modules per architecture (``config.model_type``), as in PEFT's own defaults.
TARGET_MODULES = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@contextlib.contextmanager
def quiet_peft():
    """PEFT probes a deprecated transformers attribute when it wraps a model; hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def pick_device(name: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def autocast_for(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16: autocast the forward pass (weights and LoRA factors stay fp32); fp32: nothing."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def target_modules_for(model_type: str, configured: list[str]) -> list[str]:
    """The configured target modules, or the architecture's default; unknown architectures must configure."""
    if configured:
        return list(configured)
    if model_type not in TARGET_MODULES:
        raise ConfigError(f"lora.target_modules: no default for model type {model_type!r}; set it, e.g. "
                          f"lora.target_modules=[\"q_proj\",\"v_proj\"] (known defaults: {', '.join(TARGET_MODULES)})")
    return list(TARGET_MODULES[model_type])


def _adapter_key(param_name: str, adapter_name: str) -> str | None:
    """PEFT's state-dict key for a parameter of adapter ``adapter_name``; None if not one of its."""
    for mark in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
        tag = f"{mark}{adapter_name}."
        if tag in param_name:
            return param_name.replace(tag, mark)
    tag = f".modules_to_save.{adapter_name}."
    if tag in param_name:
        return param_name.replace(tag, ".")
    return None


class SharedModel:
    """A PEFT-wrapped model shared by every client; one LoRA adapter per distinct rank.

    Args:
        base: the task model (e.g. ``AutoModelForSequenceClassification``), already on ``device``.
        task_type: PEFT task type (``"SEQ_CLS"``): makes the head a trained ``modules_to_save`` extra.
        rank, alpha, dropout, target_modules: the global LoRA settings; the ``"default"`` adapter has
            this rank and is the one saved.
    """

    def __init__(self, base: nn.Module, *, task_type: str, rank: int, alpha: float, dropout: float,
                 target_modules: list[str]):
        from peft import get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        self.task_type, self.alpha, self.dropout = task_type, float(alpha), float(dropout)
        self.target_modules = list(target_modules)
        self.global_rank = int(rank)
        try:
            with quiet_peft():
                self.model = get_peft_model(base, self._lora_config(rank))
        except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
            raise ConfigError(f"lora.target_modules = {target_modules}: {e}") from e
        self.adapters = {self.global_rank: DEFAULT_ADAPTER}
        self.lora_layers = self._lora_layers()
        self._params: dict[str, dict[str, nn.Parameter]] = {}
        self.active = DEFAULT_ADAPTER
        self.base_merged: dict[str, Tensor] = {}  # layer → Σ of merged base changes (dense, fp32)

    def _lora_config(self, rank: int):
        from peft import LoraConfig

        return LoraConfig(task_type=self.task_type, r=rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules)

    def _lora_layers(self) -> dict[str, nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    # ---- adapters by rank -------------------------------------------------------------------------
    def adapter_for_rank(self, rank: int) -> str:
        """The PEFT adapter of rank ``rank``, created on first use (one per distinct rank)."""
        if rank not in self.adapters:
            name = f"rank{rank}"
            self.model.add_adapter(name, self._lora_config(rank))
            self.adapters[rank] = name
        return self.adapters[rank]

    def params(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """PEFT key → live parameter of one adapter (LoRA factors and ``modules_to_save`` extras)."""
        if adapter_name not in self._params:
            found = {}
            for name, p in self.model.named_parameters():
                key = _adapter_key(name, adapter_name)
                if key is not None:
                    found[key] = p
            self._params[adapter_name] = found
        return self._params[adapter_name]

    def activate(self, rank: int) -> str:
        name = self.adapter_for_rank(rank)
        if name != self.active:
            self.model.set_adapter(name)
            self.active = name
        return name

    # ---- moving adapters in and out ---------------------------------------------------------------
    def load(self, adapter: Adapter, scaling: float) -> None:
        """Make ``adapter`` (at LoRA scaling ``scaling``) the model's live adapter."""
        ranks = set(adapter.ranks().values())
        if len(ranks) != 1:
            raise ConfigError(f"adapter has mixed ranks {sorted(ranks)} across layers; one rank per adapter is supported")
        name = self.activate(ranks.pop())
        live = self.params(name)
        incoming = adapter.tensors()
        missing = sorted(set(live) - set(incoming))
        unexpected = sorted(set(incoming) - set(live))
        if missing or unexpected:
            raise ConfigError(f"adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, t in incoming.items():
                p = live[key]
                if p.shape != t.shape:
                    raise ConfigError(f"adapter key {key!r}: shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
                p.copy_(t)
        self.set_scaling(scaling)

    def set_scaling(self, scaling: float) -> None:
        """Set the active adapter's LoRA scaling in every LoRA layer (PEFT reads ``scaling[name]``)."""
        for layer in self.lora_layers.values():
            layer.scaling[self.active] = float(scaling)

    def read(self) -> Adapter:
        """A detached CPU copy of the live adapter (strategies and diagnostics work on the CPU)."""
        return Adapter.from_state_dict({k: p.detach().to("cpu", copy=True) for k, p in self.params(self.active).items()})

    def live(self) -> Adapter:
        """The live adapter as autograd-tracked parameters (for a strategy's regulariser)."""
        return Adapter.from_state_dict(dict(self.params(self.active)))

    def set_trainable(self, parts: frozenset[str], extras: bool) -> list[nn.Parameter]:
        """Freeze everything except the active adapter's ``parts`` ("A", "B") and, if ``extras``, its head."""
        for name in self.adapters.values():
            for p in self.params(name).values():
                p.requires_grad_(False)
        chosen = []
        for key, p in self.params(self.active).items():
            part = "A" if ".lora_A." in key else "B" if ".lora_B." in key else "extras"
            if (part in parts) or (part == "extras" and extras):
                p.requires_grad_(True)
                chosen.append(p)
        return chosen

    # ---- base-weight merges (FedEx, FLoRA) ----------------------------------------------------------
    def merge_base(self, base_delta: Mapping[str, LoRAPair], accumulate: bool = True) -> None:
        """W₀ ← W₀ + B·A for each layer (factors already scaled), respecting ``fan_in_fan_out``."""
        for layer, pair in base_delta.items():
            module = self.lora_layers.get(layer)
            if module is None:
                raise ConfigError(f"base_delta names layer {layer!r}, which is not a LoRA layer of the model")
            delta = pair.B.to(torch.float32) @ pair.A.to(torch.float32)
            self.add_to_base(layer, delta, accumulate)

    def add_to_base(self, layer: str, delta: Tensor, accumulate: bool = True) -> None:
        """Add a dense (d_out × d_in) change to a LoRA layer's frozen base weight."""
        module = self.lora_layers[layer]
        weight = module.get_base_layer().weight
        oriented = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        with torch.no_grad():
            weight.add_(oriented.to(weight.device, weight.dtype))
        if accumulate:
            prev = self.base_merged.get(layer)
            d = delta.detach().to("cpu", torch.float32)
            self.base_merged[layer] = d if prev is None else prev + d

    def base_delta_state_dict(self, merged: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Merged base changes (default: all so far) keyed by the base model's own weight names
        (``<module>.weight``), oriented as those weights are stored (transposed for ``fan_in_fan_out``)."""
        out = {}
        prefix = "base_model.model."
        for layer, delta in (self.base_merged if merged is None else merged).items():
            module = self.lora_layers[layer]
            key = (layer[len(prefix):] if layer.startswith(prefix) else layer) + ".weight"
            out[key] = (delta.T if getattr(module, "fan_in_fan_out", False) else delta).contiguous()
        return out

    def initial_adapter(self) -> Adapter:
        """PEFT's initialisation of the global adapter (A Kaiming-uniform, B zero, the new head)."""
        return Adapter.from_state_dict({k: p.detach().to("cpu", copy=True)
                                        for k, p in self.params(DEFAULT_ADAPTER).items()})


def load_tokenizer(path: str):
    """The model's tokenizer; an unknown model raises ConfigError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a tokenizer from {path!r}: {e}") from e


def load_run_model(run_dir: str | Path, base=None):
    """The trained global model of a run: its base model (loaded from the run's config unless given),
    any merged base change (``base_delta.safetensors``) added, and the final adapter loaded with
    ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if base is None:
        import json

        from transformers import AutoModelForSequenceClassification

        from fedlora.config import load_config
        from fedlora.tasks import get_task, quiet_transformers

        cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        info = json.loads((run_dir / "summary.json").read_text())
        run_cfg = load_config(run_dir / "config.toml")
        path = cfg["base_model_name_or_path"]
        if run_cfg.data.task != "classification":  # the task's own model class (multiple-choice head, causal LM)
            task = get_task(run_cfg.data.task, load_tokenizer(path), run_cfg.data.max_length, run_cfg.data.task_options)
            base = task.load_model(path, torch.float32, None)
        else:
            with quiet_transformers():
                base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=info["num_labels"],
                                                                          dtype=torch.float32)
    delta_path = run_dir / "base_delta.safetensors"
    if delta_path.is_file():
        own = base.state_dict()
        with torch.no_grad():
            for key, delta in load_file(delta_path).items():
                own[key].add_(delta.to(own[key].dtype))
    with quiet_peft():
        return PeftModel.from_pretrained(base, run_dir / "adapter")
