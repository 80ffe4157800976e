"""tunesmith's DPO step against TRL's `DPOTrainer`, each as a user runs it, side by side in one run.

    .venv/bin/pip install -e '.[bench]'        # datasets for TRL's DPOTrainer (trl itself is a runtime dependency)
    .venv/bin/python benchmarks/dpo_vs_trl.py [--steps 12] [--rounds 2] [--model PATH]

Same pairs (the first steps x 8 of examples/data/support-prefs/train.jsonl, so each is trained on once), same model
(smollm2-135m-instruct) with the same fresh LoRA (r 16, alpha 32, all linear layers, dropout 0; the model with the
adapter off is the reference for both), batch 8 pairs, max length 256, the same number of optimizer steps; the rest
each tool's defaults (learning rate, beta 0.1, the sigmoid loss; tunesmith's bf16 frozen base and recompute where it
chooses them). Each run is its own process: `tunesmith train` on a `task: preference` config (tcmalloc preloaded, as
`python -m tunesmith train` does by itself) and a minimal TRL script (`DPOTrainer` with its defaults, glibc's
allocator). The two alternate for `--rounds` rounds so a neighbour's load hits both.

Figures: non-padding tokens per second of chosen and rejected together (prompt and reply: transformers'
`num_input_tokens_seen` over the attention mask of a batch's [chosen; rejected] rows, which both collators build,
over `train_runtime`), and the process's peak resident memory (`wait4`'s ru_maxrss; on CUDA also the peak GPU memory,
NVML). Where the reference runs differs: TRL (`precompute_ref_log_probs` False, its default) scores it in every step,
inside `train_runtime`; tunesmith scores every training reply once before the first step, outside it. So the second
table counts that pass for tunesmith (its seconds, timed around `reference_pass` in the child, added to
`train_runtime`): with each pair trained on once, it scores the same replies TRL's steps score."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from train_vs_trl import MODEL, cuda, print_round, run_child, run_trl, table

PAIRS = "examples/data/support-prefs/train.jsonl"
LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BATCH, MAX_LENGTH = 8, 256


def _pairs(out: Path, steps: int) -> Path:
    """The pairs one pass of `steps` batches trains on, in a file both tools read."""
    lines = Path(PAIRS).read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < steps * BATCH:
        raise SystemExit(f"{PAIRS} has {len(lines)} pairs; --steps {steps} needs {steps * BATCH}")
    path = out / "pairs.jsonl"
    path.write_text("".join(lines[:steps * BATCH]), encoding="utf-8")
    return path


# `tunesmith train CONFIG` (cli.main, as the command line runs it), with the reference pass timed: loop.train looks
# `reference_pass` up in its module at every call.
TUNESMITH_SCRIPT = r'''
import json, sys, time
import tunesmith.training.loop as loop
from tunesmith.cli import main

config, out = sys.argv[1], sys.argv[2]
spent, timed = [], loop.reference_pass

def reference_pass(*args, **kwargs):
    started = time.perf_counter()
    try:
        return timed(*args, **kwargs)
    finally:
        spent.append(time.perf_counter() - started)

loop.reference_pass = reference_pass
code = main(["train", config])
json.dump({"reference_seconds": sum(spent)}, open(out, "w"))
sys.exit(code)
'''


def tunesmith_once(args) -> tuple[tuple, tuple]:
    """((tokens/s of the loop, RSS, GPU), (tokens/s with the reference pass, RSS, GPU))."""
    import yaml

    from tunesmith.allocator import find_tcmalloc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        config = {"model": args.model, "task": "preference", "preference": {"objective": "dpo"},
                  "data": {"train": str(_pairs(out, args.steps)), "eval_fraction": 0}, "method": LORA,
                  "output_dir": str(out / "run"), "max_steps": args.steps, "batch_size": BATCH,
                  "max_length": MAX_LENGTH, "save_steps": 10_000, "logging_steps": args.steps,
                  "evaluate_before": False}
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        # what `python -m tunesmith train` does by itself (allocator.py), which calling cli.main skips
        library = find_tcmalloc()
        env = {**os.environ, **({"LD_PRELOAD": library} if library else {}), "TUNESMITH_TCMALLOC": "0"}
        code, rss, gpu = run_child([sys.executable, "-c", TUNESMITH_SCRIPT, str(out / "config.yaml"),
                                    str(out / "timed.json")], env)
        if code:
            raise SystemExit("tunesmith train failed")
        train = json.loads((out / "run" / "metrics.json").read_text())["train"]
        reference = json.loads((out / "timed.json").read_text())["reference_seconds"]
        tokens, seconds = train["tokens_seen"], train["train_runtime"]
        return (tokens / seconds, rss, gpu), (tokens / (seconds + reference), rss, gpu)


TRL_SCRIPT = r'''
import json, sys
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from tunesmith.models import resolve

out, data, steps, model_name, batch, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], \
    int(sys.argv[5]), int(sys.argv[6])
path = resolve(model_name)
model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(path)
pairs = load_dataset("json", data_files=data, split="train")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=max_length,
                 logging_steps=steps, save_strategy="no", report_to="none",
                 include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=peft)
result = trainer.train()
json.dump({"tokens": trainer.state.num_input_tokens_seen, "seconds": result.metrics["train_runtime"]},
          open(out + "/result.json", "w"))
'''


def trl_once(args) -> tuple[float, float, float | None]:
    return run_trl(TRL_SCRIPT, lambda tmp: [str(_pairs(tmp, args.steps)), str(args.steps), args.model, str(BATCH),
                                            str(MAX_LENGTH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="embedded name or model directory (default: %(default)s)")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    device = f"GPU {torch.cuda.get_device_name(0)}" if cuda() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; dpo, lora, "
          f"batch {BATCH} pairs, max length {MAX_LENGTH}, {args.steps} steps, {args.rounds} alternating rounds",
          flush=True)
    trl_name, ours = "TRL DPOTrainer", "tunesmith dpo"
    loop: dict[str, list] = {trl_name: [], ours: []}
    with_reference: dict[str, list] = {trl_name: loop[trl_name], ours: []}  # TRL's loop includes its reference
    for _ in range(args.rounds):
        loop[trl_name].append(trl_once(args))
        fit, whole = tunesmith_once(args)
        loop[ours].append(fit)
        with_reference[ours].append(whole)
        print_round(loop)
    print("training loop (train_runtime):")
    table(loop, trl_name)
    print("counting the reference pass (tunesmith's runs before its first step, TRL's inside every step):")
    table(with_reference, trl_name, "tokens/s + reference")


if __name__ == "__main__":
    main()
