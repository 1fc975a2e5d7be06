"""The three exports of a finished (or stopped) run, each written to a new folder atomically: the
folder is built beside ``OUT`` under a temporary name and renamed into place, so ``OUT`` is either
absent or complete. An existing non-empty ``OUT`` is refused, never overwritten."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.files import current_umask
from fedlora.runtime.rundir import RunDir

Log = Callable[[str], None]


@dataclass
class ExportedRun:
    """A run directory as the exports read it: its config, summary and final adapter."""

    rundir: RunDir
    cfg: RunConfig
    summary: dict[str, Any]
    adapter_config: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.rundir.path

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def base_delta(self) -> Path | None:
        path = self.path / "base_delta.safetensors"
        return path if path.is_file() else None

    @classmethod
    def open(cls, path: str | Path, log: Log = print) -> ExportedRun:
        """Open ``path`` for export; a folder that is no run, or a run with no adapter yet, raises
        ConfigError saying so. A run that did not complete is exported as of its last complete
        round, and ``log`` says so."""
        if not (Path(path) / "config.toml").is_file():
            raise ConfigError(f"{str(path)!r} holds no config.toml, so it is not a fedlora run directory")
        rundir = RunDir(Path(path))
        summary = rundir.read_json("summary.json")
        adapter_file = rundir.path / "adapter" / "adapter_config.json"
        if summary is None or not adapter_file.is_file():
            raise ConfigError(f"{str(rundir.path)!r} has no summary.json or adapter/ yet: a run writes them when it "
                              "ends (completed, stopped or failed); resume it to the end first")
        status = summary.get("status")
        if status != "completed":
            log(f"note: the run's status is {status!r}; exporting its last complete round "
                f"({summary.get('rounds_completed')} of {summary.get('rounds')})")
        cfg = load_config(rundir.path / "config.toml")
        return cls(rundir, cfg, summary, json.loads(adapter_file.read_text()))


@contextlib.contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; renamed to ``out`` when the block succeeds,
    removed when it fails. ``out`` must not exist, or be an empty folder."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{str(out)!r} exists and is not an empty folder; choose another output folder "
                          "(an export never overwrites)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def base_model_id(run: ExportedRun) -> str:
    """What the model card names as ``base_model``: the catalog model's Hugging Face id, or the
    configured name (a hub id or a local folder)."""
    from fedlora.assets.catalog import CATALOG

    entry = CATALOG.get(run.cfg.model.name)
    return entry.hub_id if entry is not None and entry.hub_id else run.cfg.model.name


def export_merged(run_dir: str | Path, out: str | Path, log: Log = print) -> Path:
    """The run's trained global model as a standalone Hugging Face model folder: the base model,
    plus ``base_delta.safetensors`` when the strategy merged into it (FedEx-LoRA, FLoRA), with the
    global adapter merged in (PEFT's ``merge_and_unload``), saved with ``save_pretrained``
    (safetensors), its tokenizer and a model card."""
    from fedlora.export.model_card import write_model_card
    from fedlora.runtime.model import load_run_model, load_tokenizer
    from fedlora.tasks import quiet_transformers

    run = ExportedRun.open(run_dir, log)
    model = load_run_model(run.path)  # the base (+ base_delta) with the adapter, as PeftModel
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(run.adapter_config["base_model_name_or_path"])
    with new_folder(out) as tmp, quiet_transformers():
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, run, kind="merged", base_model=base_model_id(run), architecture=type(merged).__name__)
    log(f"wrote the merged model to {out}: load it with {type(merged).__name__}.from_pretrained({str(out)!r})")
    return Path(out)


def export_adapter(run_dir: str | Path, out: str | Path, log: Log = print) -> Path:
    """The run's global adapter in PEFT format with a model card. A strategy that merged changes
    into the base weights (FedEx-LoRA, FLoRA) has no adapter that is the model on its own: refused,
    pointing at ``--merged``."""
    from fedlora.export.model_card import write_model_card

    run = ExportedRun.open(run_dir, log)
    if run.base_delta is not None:
        raise ConfigError(f"strategy {run.cfg.strategy.name!r} merged changes into the base weights "
                          f"({run.base_delta}), so its adapter alone is not the trained model; export the whole "
                          f"model with: fedlora export {run.path} --merged OUT")
    with new_folder(out) as tmp:
        config = dict(run.adapter_config, base_model_name_or_path=base_model_id(run))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(run.adapter_dir / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        write_model_card(tmp, run, kind="adapter", base_model=base_model_id(run))
    log(f"wrote the global adapter to {out}: PeftModel.from_pretrained(base, {str(out)!r})")
    return Path(out)


def export_client_adapter(run_dir: str | Path, client: int, out: str | Path, log: Log = print) -> Path:
    """Client ``client``'s own adapter, for strategies that keep personal state (FedSA-LoRA's and
    SFed-LoRA's B): the strategy's ``client_start`` from the last checkpoint's global state and the
    client's personal state (the model that client evaluates and trains from), at the client's
    LoRA scaling."""
    from fedlora.export.model_card import write_model_card
    from fedlora.strategies import ClientContext
    from fedlora.strategies.registry import make_strategy

    run = ExportedRun.open(run_dir, log)
    strategy = make_strategy(run.cfg.strategy.name, run.cfg.strategy.options)
    if not strategy.personalised:
        raise ConfigError(f"--client: strategy {strategy.name!r} keeps no personal state, so every client's model "
                          f"is the global adapter; export it with: fedlora export {run.path} --adapter OUT")
    num_clients = int(run.summary.get("num_clients") or run.cfg.partition.num_clients)
    if not 0 <= client < num_clients:
        raise ConfigError(f"--client {client}: the run has clients 0 to {num_clients - 1}")
    if run.summary.get("engine") == "flower":  # nothing personal leaves a node (fedlora.flower.nodestore)
        raise ConfigError(f"--client {client}: {str(run.path)!r} ran on Flower, where each client's personal state "
                          "stays on its node (fedlora-state-dir, default $FEDLORA_CACHE/flower-nodes/<run token>/"
                          f"client-{client}.pt), not in the run directory; export client adapters from an "
                          "embedded run")
    ckpt = run.rundir.load_checkpoint()
    personal = None if ckpt is None else ckpt["personal"].get(client)
    if personal is None:
        raise ConfigError(f"--client {client}: that client has no personal state in {run.rundir.checkpoint_path} "
                          "(it never took part in a round); its model is the global adapter")
    state = ckpt["state"]
    ranks = run.cfg.lora.client_ranks or [run.cfg.lora.r]
    train = ckpt["extra"].get("client_train")
    # as the run's personal evaluation builds it (fedlora.runtime.evaluation.evaluate_client)
    ctx = ClientContext(client_id=client, round=state.round, rank=ranks[client % len(ranks)],
                        num_samples=len(train[client]) if train is not None else 1, alpha=run.cfg.lora.alpha,
                        num_clients=num_clients, total_clients=num_clients, seed=run.cfg.run.seed)
    adapter = strategy.client_start(state, personal, ctx)
    rank = next(iter(adapter.layers.values())).rank
    scaling = strategy.scaling(ctx, rank)
    with new_folder(out) as tmp:
        staged = RunDir(tmp)
        written = staged.save_adapter(adapter, scaling=scaling, base_model=base_model_id(run),
                                      task_type=run.adapter_config["task_type"],
                                      target_modules=sorted(run.adapter_config["target_modules"]),
                                      dropout=float(run.adapter_config.get("lora_dropout", 0.0)), base_delta={})
        for name in os.listdir(written):  # save_adapter writes into an adapter/ subfolder: lift it out
            os.replace(written / name, tmp / name)
        written.rmdir()
        write_model_card(tmp, run, kind="client", base_model=base_model_id(run), client=client)
    log(f"wrote client {client}'s adapter to {out}: PeftModel.from_pretrained(base, {str(out)!r})")
    return Path(out)
