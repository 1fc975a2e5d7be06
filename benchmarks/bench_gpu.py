"""The engine on a GPU at the papers' shapes, with nothing downloaded: s/round and tokens/s.

Two random-init models of the papers' shapes, built here with a synthetic word-level tokenizer and
synthetic data (so the script needs no hub, no catalog and no network, as on the device machine):

- ``roberta-large``: RobertaForSequenceClassification, 24 layers, hidden 1024 (355 M parameters),
  binary labels (a sentence's label is whether it holds a marker word);
- ``llama-1b``: LlamaForCausalLM, 16 layers, hidden 2048, 32 heads (≈1.1 B parameters, TinyLlama's
  shape), prompt → answer sums.

Each runs 10 clients, full participation, LoRA r = 8 on the attention projections, bf16 autocast,
for fedit (the reference), fedrot and flexlora, ``--rounds`` rounds of ``--steps`` local steps.
Reported per strategy: median s/round over the rounds after the first (warm-up), training tokens/s
(clients × steps × batch × sequence length, every sequence filled to ``--seq``, over the rounds'
training seconds), and s/round as a ratio to fedit's, measured in the same run.

    python benchmarks/bench_gpu.py                          # CUDA; about 3-4 minutes on one H200
    python benchmarks/bench_gpu.py --tiny --device cpu      # a smoke check of the script on CPU

Writes benchmarks/results/gpu.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # name: (task, transformers config class, config kwargs, tiny kwargs for --tiny)
    "roberta-large": ("classification", "RobertaConfig",
                      dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           max_position_embeddings=514, type_vocab_size=1, num_labels=2, pad_token_id=1),
                      dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)),
    "llama-1b": ("causal_lm", "LlamaConfig",
                 dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, max_position_embeddings=2048, tie_word_embeddings=False),
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128)),
}
VOCAB = 32000


def make_tokenizer(folder: Path, causal: bool):
    """A word-level tokenizer over ``w0 … w{VOCAB}``, the digits, and a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = ["what", "is", "plus", "?", "the", "result", "good"] + [str(n) for n in range(200)]
    vocab = {w: i for i, w in enumerate(specials + words + [f"w{i}" for i in range(VOCAB - len(specials) - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not causal:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
            ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, name: str, tiny: bool) -> None:
    import torch
    import transformers

    task, config_class, shape, small = SHAPES[name]
    cfg = getattr(transformers, config_class)(vocab_size=VOCAB, **(small if tiny else shape))
    model_class = transformers.RobertaForSequenceClassification if task == "classification" \
        else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    make_tokenizer(folder, causal=task == "causal_lm")
    if task == "causal_lm":
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 2, 3
    model_class(cfg).save_pretrained(folder)


def make_data(path: Path, task: str, n: int, seq: int, seed: int = 0) -> None:
    """``n`` examples whose token length is about ``seq`` (every batch is full)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            filler = " ".join(f"w{rng.randrange(VOCAB - 300)}" for _ in range(seq))
            if task == "classification":
                y = rng.randint(0, 1)
                f.write(json.dumps({"text": ("good " if y else "") + filler, "label": y}) + "\n")
            else:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                f.write(json.dumps({"question": f"{filler} what is {a} plus {b} ?", "answer": str(a + b),
                                    "template": 0}) + "\n")


def overrides(args, name: str, model: Path, data: Path, out: Path, strategy: str) -> list[str]:
    task = SHAPES[name][0]
    values = {
        "model.name": f'"{model}"', "model.device": f'"{args.device}"', "model.dtype": f'"{args.dtype}"',
        "data.source": f'"{data}"', "data.task": f'"{task}"', "data.max_length": str(args.seq),
        "data.eval_examples": "64", "eval.every": "1000", "eval.personalised": "false", "eval.batch_size": "32",
        "partition.num_clients": str(args.clients), "partition.method": '"iid"', "train.rounds": str(args.rounds),
        "train.local_steps": str(args.steps), "train.batch_size": str(args.batch), "train.lr": "1e-4",
        "lora.r": "8", "lora.alpha": "16", "strategy.name": f'"{strategy}"', "run.output_dir": f'"{out}"',
        "run.name": f'"{name}-{strategy}"', "run.progress": "false",
    }
    if task == "classification":
        values["data.columns"] = '{text = "text", label = "label"}'
    else:
        values["data.task_options"] = "{prompt_column = \"question\", max_new_tokens = 4, generate_examples = 8}"
        values["data.columns"] = "{}"
    return [f"{k}={v}" for k, v in values.items()]


def bench(args, name: str, root: Path) -> list[dict]:
    from fedlora.config import load_config
    from fedlora.runtime.rundir import RunDir
    from fedlora.sim import run

    folder, data = root / name, root / f"{name}.jsonl"
    make_model(folder, name, args.tiny)
    make_data(data, SHAPES[name][0], n=args.clients * args.batch * args.steps * 2 + 200, seq=args.seq)
    out = []
    for strategy in args.strategies.split(","):
        t0 = time.perf_counter()
        summary = run(load_config(None, overrides(args, name, folder, data, root / "runs", strategy)),
                      progress=False, log=lambda s: None)
        rows = RunDir.open(summary["run_dir"]).read_metrics()
        timed = rows[1:] or rows  # round 1 pays for kernels, allocator, first copies
        tokens = args.clients * args.steps * args.batch * args.seq
        out.append({"model": name, "strategy": strategy, "rounds": len(rows),
                    "s_per_round": statistics.median(r["wall_s"] for r in timed),
                    "tokens_per_s": tokens * len(timed) / sum(r["train_s"] for r in timed),
                    "first_round_s": rows[0]["wall_s"], "total_s": time.perf_counter() - t0})
        print(f"{name} {strategy}: {out[-1]['s_per_round']:.2f} s/round", flush=True)
    ref = next(r for r in out if r["strategy"] == "fedit")["s_per_round"] if any(
        r["strategy"] == "fedit" for r in out) else None
    for r in out:
        r["vs_fedit"] = r["s_per_round"] / ref if ref else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="roberta-large,llama-1b")
    p.add_argument("--strategies", default="fedit,fedrot,flexlora")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke check of the script")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = p.parse_args()

    import torch

    from fedlora.files import atomic_json

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in args.models.split(",") for r in bench(args, name, Path(tmp))]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    atomic_json(args.out, {"args": vars(args), "device": device, "torch": torch.__version__, "rows": rows,
                           "seconds": time.perf_counter() - t0})
    print(f"\n{device}, {args.clients} clients × {args.steps} steps × batch {args.batch} × {args.seq} tokens, "
          f"{args.dtype}, {args.rounds} rounds{' (tiny shapes)' if args.tiny else ''}")
    print("| model | strategy | s/round | vs fedit | tokens/s | first round s |\n|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_fedit']:.2f}×" if r["vs_fedit"] else "—"
        print(f"| {r['model']} | {r['strategy']} | {r['s_per_round']:.2f} | {vs} | {r['tokens_per_s']:,.0f} | "
              f"{r['first_round_s']:.1f} |")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
