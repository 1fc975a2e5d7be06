"""Multiple choice and causal LM on tiny random models: the scores, losses and generations against
independent computations, then whole federated runs under several strategies."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.data import load_source
from fedlora.errors import ConfigError
from fedlora.sim import run
from fedlora.tasks import get_task
from fedlora.tasks.choice import choice_fields, clean_hellaswag
from sim_tiny import make_tiny_model, tiny_overrides
from task_tiny import make_tiny_llama, make_toy_choice, make_toy_math

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, tiny llama folder, tiny bert folder, toy math file, toy choice file)."""
    root = tmp_path_factory.mktemp("tasks")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLORA_CACHE", str(root / "cache"))
    yield (root, make_tiny_llama(root / "tiny-llama"), make_tiny_model(root / "tiny-bert"),
           make_toy_math(root / "math.jsonl"), make_toy_choice(root / "choice.jsonl"))
    mp.undo()


def task_for(name, model_dir, max_length=64, **options):
    from transformers import AutoTokenizer

    return get_task(name, AutoTokenizer.from_pretrained(model_dir), max_length, options)


def loaded(task, model_dir, data_file):
    split = load_source(str(data_file))["train"]
    task.check_columns(split)
    torch.manual_seed(0)
    return task.encode(split), task.load_model(str(model_dir), torch.float32, split)


# ---- scoring and losses against direct computations -------------------------------------------------


def test_decoder_choice_scores_are_mean_logprobs_of_the_choice_tokens(tiny):
    root, llama, _, _, choice = tiny
    task = task_for("multiple_choice", llama)
    data, model = loaded(task, llama, choice)
    assert task.kind == "loglik" and task.peft_task_type == "CAUSAL_LM"
    idx = [0, 1, 2, 3]
    with torch.no_grad():
        scores = task.scores(model, task.collate(data, idx, CPU))
        for row, i in enumerate(idx):
            prompt = data.features["prompt_ids"][i]
            for j, ending in enumerate(data.features["choice_ids"][i]):
                # one unpadded sequence at a time: log p(ending | prompt), averaged over the ending's tokens
                logp = torch.log_softmax(model(torch.tensor([prompt + ending])).logits[0].double(), -1)
                want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(ending)) / len(ending)
                assert float(scores[row, j]) == pytest.approx(want, abs=1e-5)


def test_decoder_choice_loss_options(tiny):
    root, llama, _, _, choice = tiny
    ce = task_for("multiple_choice", llama)
    data, model = loaded(ce, llama, choice)
    batch = ce.collate(data, [0, 1, 2, 3, 4], CPU)
    with torch.no_grad():
        scores = ce.scores(model, batch)
        assert float(ce.loss(model, batch)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(scores, batch["labels"])), abs=1e-6)
        # "lm": plain LM loss on the right choice's tokens; transformers' own loss is the reference
        lm = task_for("multiple_choice", llama, loss="lm")
        lm.encode(load_source(str(choice))["train"])
        nll, n = 0.0, 0
        for i in range(5):
            p, c = data.features["prompt_ids"][i], data.features["choice_ids"][i][int(data.labels[i])]
            out = model(torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c]))
            nll, n = nll + float(out.loss) * len(c), n + len(c)
        assert float(lm.loss(model, batch)) == pytest.approx(nll / n, abs=1e-5)


def test_encoder_choice_head_is_trained_and_federated(tiny):
    """AutoModelForMultipleChoice under PEFT SEQ_CLS: the head is a modules_to_save extra and lands
    in the adapter state dict; the logits are one per choice and missing choices are masked."""
    from fedlora.runtime.model import SharedModel

    root, _, bert, _, choice = tiny
    task = task_for("multiple_choice", bert)
    data, model = loaded(task, bert, choice)
    assert task.kind == "head" and type(model).__name__ == "BertForMultipleChoice"
    shared = SharedModel(model, task_type=task.peft_task_type, rank=2, alpha=4, dropout=0.0,
                         target_modules=["query", "value"])
    keys = set(shared.params("default"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    data.features["input_ids"][0] = data.features["input_ids"][0][:1]  # a question with one choice
    batch = task.collate(data, [0, 1, 2], CPU)
    assert batch["input_ids"].shape[:2] == (3, 2) and not bool(batch["choice_mask"][0, 1])
    with torch.no_grad():
        scores = task.scores(shared.model, batch)
    assert scores[0, 1] == float("-inf") and torch.isfinite(scores[1:]).all()
    assert float(torch.softmax(scores, -1)[0, 0]) == 1.0


def test_causal_loss_counts_only_answer_tokens(tiny):
    root, llama, _, math_file, _ = tiny
    task = task_for("causal_lm", llama)
    data, model = loaded(task, llama, math_file)
    batch = task.collate(data, [3, 1, 4, 5], CPU)
    labels = batch["labels"]
    for row, i in enumerate([3, 1, 4, 5]):
        p, t = data.features["prompt_ids"][i], data.features["target_ids"][i]
        assert (labels[row, : len(p)] == -100).all() and labels[row, len(p): len(p) + len(t)].tolist() == t
        assert (labels[row, len(p) + len(t):] == -100).all()
    with torch.no_grad():
        want = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=labels).loss
        assert float(task.loss(model, batch)) == pytest.approx(float(want), abs=1e-5)


def test_chat_template_prompt_and_target(tiny):
    root, llama, _, math_file, _ = tiny
    task = task_for("causal_lm", llama)
    tok = task.tokenizer
    head, tail = task.render("what is 1 plus 2 ?", "1 plus 2 is 3 . #### 3")
    assert head == "<|im_start|>user\nwhat is 1 plus 2 ?<|im_end|>\n<|im_start|>assistant\n"
    assert tail == "1 plus 2 is 3 . #### 3<|im_end|>"  # the end-of-turn token is trained, so generation stops
    data = task.encode(load_source(str(math_file))["train"])
    assert data.features["target_ids"][0][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    plain = task_for("causal_lm", llama, chat_template=False)
    head, tail = plain.render("what is 1 plus 2 ?", "3")
    assert (head, tail) == ("what is 1 plus 2 ?\n", "3")
    data = plain.encode(load_source(str(math_file))["train"])
    assert data.features["target_ids"][0][-1] == tok.eos_token_id  # without a template, EOS ends the answer


def test_long_examples_are_truncated_keeping_the_answer(tiny):
    root, llama, _, math_file, _ = tiny
    task = task_for("causal_lm", llama, max_length=12)
    data = task.encode(load_source(str(math_file))["train"])
    for p, t in zip(data.features["prompt_ids"], data.features["target_ids"]):
        assert len(p) + len(t) <= 12 and len(p) >= 1 and len(t) >= 1


def test_generation_with_left_padding_equals_one_at_a_time(tiny):
    root, llama, _, math_file, _ = tiny
    task = task_for("causal_lm", llama, max_new_tokens=6)
    data, model = loaded(task, llama, math_file)
    idx = [0, 7, 11, 19]
    assert len({len(data.features["prompt_ids"][i]) for i in idx}) > 1  # prompts of different lengths
    batched = task.generate(model.eval(), data, idx, 4, CPU)
    single = [task.generate(model, data, [i], 1, CPU)[0] for i in idx]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_causal_eval_reports_loss_perplexity_exact_match_and_samples(tiny, monkeypatch):
    root, llama, _, math_file, _ = tiny
    task = task_for("causal_lm", llama, generate_examples=4, samples=2, max_new_tokens=4)
    data, model = loaded(task, llama, math_file)
    refs = data.meta["references"]
    # a stand-in generator that answers the first two right (one GSM8K-style, one with a $ and a period)
    fake = [f"so it is {refs[0]} . #### {refs[0]}", f"The answer is ${refs[1]}.", "no idea", "#### 100000"]
    monkeypatch.setattr(task, "generate", lambda *a, **k: fake)
    out = task.evaluate(model, data, list(range(10)), 4, CPU)
    assert out["accuracy"] == pytest.approx(0.5) and out["generated"] == 4 and out["examples"] == 10
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    with torch.no_grad():  # the loss is per answer token over all ten examples
        batch = task.collate(data, list(range(10)), CPU)
        assert out["loss"] == pytest.approx(float(task.loss(model, batch)), abs=1e-5)
    assert [s["correct"] for s in out["samples"]] == [True, True]
    assert out["samples"][0]["reference"] == refs[0] and "prompt" in out["samples"][0]


# ---- data ----------------------------------------------------------------------------------------------


def test_hellaswag_schema_maps_to_question_choices_label():
    import datasets

    split = datasets.Dataset.from_dict({
        "ctx_a": ["A man is sitting on a roof."], "ctx_b": ["he"], "activity_label": ["Roof shingle removal"],
        "endings": [["is using wrap  to wrap a pair of skis.", "starts pulling up roofing [title] on a roof.",
                     "is ripping level tiles off.", "holds a rubik's cube."]], "label": ["3"]})
    questions, choices, labels = choice_fields(split)
    assert questions == ["A man is sitting on a roof. he"] and labels == [3]
    assert choices[0][0] == "is using wrap to wrap a pair of skis." and choices[0][1] == "starts pulling up roofing. on a roof."
    assert clean_hellaswag("Cooking [title] Mix  it.") == "Cooking. Mix it."
    # a label the data layer turned into a ClassLabel over the strings "0".."3" maps back through the names
    cast = split.cast_column("label", datasets.ClassLabel(names=["", "0", "1", "2", "3"]))
    assert cast["label"] == [4] and choice_fields(cast)[2] == [3]
    bad = datasets.Dataset.from_dict({"question": ["q"], "choices": [["a", "b"]], "label": [2]})
    with pytest.raises(ConfigError, match="label 2 but 2 choices"):
        choice_fields(bad)


def test_bad_task_options_and_columns_are_config_errors(tiny):
    root, llama, bert, math_file, choice = tiny
    with pytest.raises(ConfigError, match="scoring"):
        task_for("multiple_choice", bert, scoring="best")
    with pytest.raises(ConfigError, match="answer_format"):
        task_for("causal_lm", llama, answer_format="fuzzy")
    with pytest.raises(ConfigError, match="question, choices, label"):
        task_for("multiple_choice", bert).check_columns(load_source(str(math_file))["train"])
    with pytest.raises(ConfigError, match="data.task_options.beam"):
        task_for("causal_lm", llama, beam=4)
    with pytest.raises(ConfigError, match="target_column"):
        task_for("causal_lm", llama, target_column="nope").check_columns(load_source(str(math_file))["train"])


# ---- whole federated runs ------------------------------------------------------------------------------


def to_toml_table(options: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + "}"


def task_config(tiny, name, *, task, model, data, **extra):
    root = tiny[0]
    return load_config(None, tiny_overrides(root / "runs", model, data, run__name=f'"{name}"', data__task=f'"{task}"',
                                            data__columns="{}", **extra))


CASES = {  # name → (task, model index in the fixture, data index, task options)
    "choice-encoder": ("multiple_choice", 2, 4, {}),
    "choice-decoder": ("multiple_choice", 1, 4, {}),
    "causal": ("causal_lm", 1, 3, {"max_new_tokens": 3, "generate_examples": 4}),
}


@pytest.mark.parametrize("strategy", ["fedit", "fedrot", "fedsa", "flora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_task_type_runs_two_rounds(tiny, case, strategy):
    task, model_i, data_i, options = CASES[case]
    cfg = task_config(tiny, f"{case}-{strategy}", task=task, model=tiny[model_i], data=tiny[data_i],
                      strategy__name=f'"{strategy}"', partition__num_clients="2", eval__client_examples="4",
                      data__eval_examples="12", data__task_options=to_toml_table(options))
    summary = run(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert [r["round"] for r in rows] == [0, 1] and summary["status"] == "completed"
    for r in rows:
        assert not r["failed"] and math.isfinite(r["train_loss"])
        g = r["eval"]["global"]
        assert 0 <= g["accuracy"] <= 1 and math.isfinite(g["loss"]) and g["examples"] == 12
        assert "accuracy_weighted" in r["eval"]["personal"]
    from safetensors.torch import load_file

    keys = set(load_file(f"{summary['run_dir']}/adapter/adapter_model.safetensors"))
    assert any(".lora_A." in k for k in keys)
    assert any("classifier" in k for k in keys) == (case == "choice-encoder")
    if strategy == "fedit":  # the saved run loads back (its task's model class) and reproduces the last eval
        from fedlora.runtime.federation import prepare
        from fedlora.runtime.model import load_run_model

        fed = prepare(cfg, log=lambda s: None)
        again = fed.task.evaluate(load_run_model(summary["run_dir"]), fed.validation, fed.eval_indices, 32, CPU)
        assert again["loss"] == pytest.approx(rows[-1]["eval"]["global"]["loss"], rel=1e-5)
    if task == "causal_lm":
        g = rows[-1]["eval"]["global"]
        assert g["perplexity"] == pytest.approx(math.exp(g["loss"])) and g["generated"] == 4
        assert summary["samples"] and {"prompt", "generated", "reference", "correct"} <= set(summary["samples"][0])
