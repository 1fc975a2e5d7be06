"""In and out of the Hugging Face world: ``lora.init_adapter`` and ``fedlora export``.

The merged exports are checked against a reference built here by hand (the base model, the run's
base_delta added, ``PeftModel.from_pretrained(base, RUN/adapter)``), on a tiny BERT, a tiny Llama
and the real MiniLM; a run started from an exported adapter must begin exactly where the exporting
run ended (its start evaluation equals the exporting run's last one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sim_tiny import tiny_fixture, tiny_overrides
from task_tiny import make_tiny_llama, make_toy_math

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.export import export_adapter, export_client_adapter, export_merged
from fedlora.sim import run

QUIET = {"log": lambda s: None}


tiny = tiny_fixture("export")


def tiny_cfg(tiny, name, **extra):
    root, model, data = tiny
    return load_config(None, tiny_overrides(root / "runs", model, data, run__name=f'"{name}"', **extra))


@pytest.fixture(scope="module")
def runs(tiny):
    """One finished tiny run per strategy the tests export, by name."""
    out = {}
    for strategy in ("fedit", "fedex", "fedsa"):
        out[strategy] = run(tiny_cfg(tiny, strategy, strategy__name=f'"{strategy}"', train__lr="0.05"), **QUIET)
    return out


def reference_model(run_dir, base):
    """The trained model by hand: ``base`` + base_delta.safetensors, then PEFT loads the adapter."""
    from peft import PeftModel

    delta = Path(run_dir) / "base_delta.safetensors"
    if delta.is_file():
        own = base.state_dict()
        with torch.no_grad():
            for key, d in load_file(delta).items():
                own[key].add_(d)
    return PeftModel.from_pretrained(base, Path(run_dir) / "adapter").eval()


def bert_inputs(model_dir, texts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")


TEXTS = ["the movie was great", "a very bad plot and the actor", "quite fine film", "awful scene"]


def test_merged_export_of_a_run_that_merged_into_its_base_gives_the_reference_logits(tiny, runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, model_dir, _ = tiny
    run_dir = runs["fedex"]["run_dir"]
    assert (Path(run_dir) / "base_delta.safetensors").is_file()  # FedEx merged residuals into the base
    export_merged(run_dir, tmp_path / "merged", **QUIET)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ref = reference_model(run_dir, AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2))
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    x = bert_inputs(tmp_path / "merged", TEXTS)  # the exported tokenizer
    with torch.no_grad():
        got, want = exported(**x).logits, ref(**x).logits
        untrained = plain(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, untrained, atol=1e-3)  # the export is not the base model
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "FedEx-LoRA" in card and "library_name: transformers" in card
    assert f"{runs['fedex']['final_accuracy']:.4f}" in card


def test_merged_export_of_a_causal_lm(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    llama, data = make_tiny_llama(tmp_path / "tiny-llama"), make_toy_math(tmp_path / "math.jsonl")
    cfg = load_config(None, tiny_overrides(tmp_path / "runs", llama, data, data__task='"causal_lm"', data__columns="{}",
                                           strategy__name='"flora"', train__lr="0.05", data__eval_examples="8",
                                           data__task_options="{max_new_tokens = 2, generate_examples = 2}"))
    summary = run(cfg, **QUIET)
    assert summary["base_delta"]
    main(["export", summary["run_dir"], "--merged", str(tmp_path / "merged")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = reference_model(summary["run_dir"], AutoModelForCausalLM.from_pretrained(llama))
    ids = torch.tensor([[1, 5, 9, 12, 7, 3], [2, 4, 6, 8, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert "pipeline_tag: text-generation" in (tmp_path / "merged" / "README.md").read_text()


def last_global_eval(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return rows[-1]["eval"]["global"]


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "fedrot", "flora"])
def test_a_run_from_an_exported_adapter_starts_where_the_exporting_run_ended(tiny, engine, transport, strategy,
                                                                              tmp_path):
    """The first run is always FedIT, so the adapter's A is PEFT's draw, not one that FFA's seeded A or
    FLoRA's seeded restart would reproduce: a strategy that re-initialised would not start there."""
    first = engine(tiny_cfg(tiny, f"a-{strategy}-{transport}", strategy__name='"fedit"', train__lr="0.05"), **QUIET)
    export_adapter(first["run_dir"], tmp_path / "adapter", **QUIET)
    # lora.r / alpha / target_modules are left out: the adapter fills them in
    second = engine(tiny_cfg(tiny, f"b-{strategy}-{transport}", strategy__name=f'"{strategy}"', train__rounds="1",
                             lora__init_adapter=f'"{tmp_path / "adapter"}"'), **QUIET)
    assert second["initial_eval"] == last_global_eval(first["run_dir"])
    assert second["status"] == "completed"


def test_an_adapter_at_another_scaling_keeps_its_delta_w(tiny, runs, tmp_path):
    """An rsLoRA adapter (scaling alpha/√r) started under fedlora's alpha/r: B is rescaled so that
    s·B·A, and so the start evaluation, is unchanged; for FedIT and for FedEx-LoRA."""
    src = Path(runs["fedit"]["run_dir"])
    config = json.loads((src / "adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    rs = tmp_path / "rslora"
    rs.mkdir()
    (rs / "adapter_config.json").write_text(json.dumps(dict(config, use_rslora=True,
                                                            lora_alpha=scaling * config["r"] ** 0.5)))
    (rs / "adapter_model.safetensors").write_bytes((src / "adapter" / "adapter_model.safetensors").read_bytes())
    want = last_global_eval(src)
    for strategy in ("fedit", "fedex"):
        again = run(tiny_cfg(tiny, f"rslora-{strategy}", strategy__name=f'"{strategy}"', train__rounds="1",
                             lora__init_adapter=f'"{rs}"'), **QUIET)
        assert again["initial_eval"] == want


def test_client_export_is_the_shared_A_with_the_clients_own_B(runs, tmp_path):
    run_dir = Path(runs["fedsa"]["run_dir"])
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    export_client_adapter(run_dir, 1, tmp_path / "client1", **QUIET)
    got = load_file(tmp_path / "client1" / "adapter_model.safetensors")
    glob = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    personal = ckpt["personal"][1]
    a_keys = [k for k in got if ".lora_A." in k]
    b_keys = [k for k in got if ".lora_B." in k]
    assert a_keys and b_keys and set(got) == set(glob)
    for k in a_keys:
        torch.testing.assert_close(got[k], glob[k], rtol=0, atol=0)
    for k in b_keys:
        torch.testing.assert_close(got[k], personal[k], rtol=0, atol=0)
    assert any(not torch.equal(got[k], glob[k]) for k in b_keys)  # B is the client's, not the average
    config = json.loads((tmp_path / "client1" / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == pytest.approx(ckpt["state"]["scaling"])
    assert "client 1" in (tmp_path / "client1" / "README.md").read_text()


def test_export_refusals_name_the_way_round(runs, tmp_path):
    with pytest.raises(ConfigError, match="--merged OUT"):
        export_adapter(runs["fedex"]["run_dir"], tmp_path / "x", **QUIET)
    with pytest.raises(ConfigError, match="keeps no personal state"):
        export_client_adapter(runs["fedit"]["run_dir"], 0, tmp_path / "x", **QUIET)
    with pytest.raises(ConfigError, match="clients 0 to 2"):
        export_client_adapter(runs["fedsa"]["run_dir"], 3, tmp_path / "x", **QUIET)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", runs["fedit"]["run_dir"], "--adapter", str(taken)]) == 2
    assert (taken / "keep.txt").read_text() == "mine" and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert main(["export", str(tmp_path), "--adapter", str(tmp_path / "y")]) == 2  # not a run directory
    assert main(["export", runs["fedit"]["run_dir"], "--client", "1", "--merged", str(tmp_path / "z")]) == 2


def test_init_adapter_settings_come_from_the_adapter_and_a_conflict_names_both(tiny, runs, tmp_path):
    adapter = Path(runs["fedit"]["run_dir"]) / "adapter"
    cfg = tiny_cfg(tiny, "filled", lora__init_adapter=f'"{adapter}"', train__rounds="1")
    theirs = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (
        theirs["r"], theirs["lora_alpha"], sorted(theirs["target_modules"]))
    with pytest.raises(ConfigError, match=r"lora.r = 8, but .*adapter_config.json has r = 4"):
        tiny_cfg(tiny, "clash", lora__init_adapter=f'"{adapter}"', lora__r="8")
    with pytest.raises(ConfigError, match=r"lora.alpha = 3.0, but .* has lora_alpha = 8.0"):
        tiny_cfg(tiny, "clash", lora__init_adapter=f'"{adapter}"', lora__alpha="3")
    with pytest.raises(ConfigError, match="lora.init_adapter = .*no such folder"):
        tiny_cfg(tiny, "gone", lora__init_adapter=f'"{tmp_path / "nope"}"')
    # a run's stored config.toml gives all three: it still loads (to resume or export) once the
    # start adapter is gone, but a new run from it says the folder is missing
    stored = tiny_cfg(tiny, "stored", lora__init_adapter=f'"{tmp_path / "nope"}"', lora__r="4", lora__alpha="8",
                      lora__target_modules='["query", "value"]', train__rounds="1")
    with pytest.raises(ConfigError, match="lora.init_adapter = .*no such folder"):
        run(stored, **QUIET)
    with pytest.raises(ConfigError, match="base_delta.safetensors.*--merged OUT"):  # FedEx: the adapter is not the model
        tiny_cfg(tiny, "fedex-start", lora__init_adapter=f'"{Path(runs["fedex"]["run_dir"]) / "adapter"}"')
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps(dict(theirs, use_dora=True)))
    with pytest.raises(ConfigError, match="use_dora = True"):
        tiny_cfg(tiny, "dora", lora__init_adapter=f'"{dora}"')


def test_an_adapter_of_another_model_is_refused_naming_its_tensors(tiny, runs, tmp_path):
    """Same rank and targets, but trained with a 3-label head: the head's shape is named."""
    cfg = tiny_cfg(tiny, "three-labels", train__rounds="1")
    bad = tmp_path / "bad"
    bad.mkdir()
    src = Path(runs["fedit"]["run_dir"]) / "adapter"
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    head = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[head] = torch.zeros(3, tensors[head].shape[1])
    from safetensors.torch import save_file

    save_file(tensors, bad / "adapter_model.safetensors")
    cfg = tiny_cfg(tiny, "three-labels", train__rounds="1", lora__init_adapter=f'"{bad}"')
    with pytest.raises(ConfigError, match=r"classifier.weight.*shape \(3, 64\)"):
        run(cfg, **QUIET)
    tensors[head] = tensors[head][:2]
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="no place for.*pooler"):
        run(cfg, **QUIET)


# ---- the real MiniLM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from fedlora.assets import AssetError, resolve_model
    from fedlora.data import read_source

    try:
        read_source("sarcasm")
        return resolve_model("minilm")
    except AssetError as e:
        pytest.skip(f"catalog assets unavailable: {e}")


def minilm_cfg(root, name, **extra):
    values = {"model.name": "minilm", "data.source": "sarcasm", "data.eval_examples": "64",
              "partition.method": '"iid"', "partition.num_clients": "2", "train.rounds": "1",
              "train.local_steps": "3", "train.lr": "5e-3", "eval.client_examples": "16",
              "run.output_dir": f'"{root}"', "run.progress": "false", "run.name": f'"{name}"'}
    values.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.slow
def test_minilm_merged_export_and_a_restart_from_its_adapter(minilm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fedex = run(minilm_cfg(tmp_path, "fedex", strategy__name='"fedex"'), **QUIET)
    main(["export", fedex["run_dir"], "--merged", str(tmp_path / "merged")])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ref = reference_model(fedex["run_dir"], AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2))
    x = AutoTokenizer.from_pretrained(tmp_path / "merged")(
        ["thirteen-year-old wins spelling bee by spelling 'abdication'", "area man passionate defender of what he "
         "imagines constitution to be"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**x).logits, ref(**x).logits, rtol=1e-4, atol=1e-5)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

    fedsa = run(minilm_cfg(tmp_path, "fedsa", strategy__name='"fedsa"'), **QUIET)
    assert main(["export", fedsa["run_dir"], "--adapter", str(tmp_path / "adapter")]) == 0
    again = run(minilm_cfg(tmp_path, "again", strategy__name='"fedsa"',
                           lora__init_adapter=f'"{tmp_path / "adapter"}"'), **QUIET)
    assert again["initial_eval"] == last_global_eval(fedsa["run_dir"])


def test_client_export_of_a_flower_run_says_where_the_state_is(tiny, tmp_path):
    from engines import flower_run

    summary = flower_run(tiny_cfg(tiny, "fedsa-flower", strategy__name='"fedsa"'), **QUIET)
    with pytest.raises(ConfigError, match="ran on Flower.*client-1.pt"):
        export_client_adapter(summary["run_dir"], 1, tmp_path / "c1", **QUIET)
    assert not (tmp_path / "c1").exists()
