"""`tunesmith train` against TRL's `SFTTrainer`, each as a user runs it, side by side in one run.

    .venv/bin/pip install -e '.[bench]'        # TRL: a benchmark dependency, never a runtime one
    .venv/bin/python benchmarks/train_vs_trl.py [--steps 12] [--rounds 2] [--method lora|full]

Same data (examples/data/support-chat/train.jsonl), same model (smollm2-135m-instruct), same LoRA (r 16, alpha 32,
all linear layers, dropout 0) or full fine-tuning, batch 8, max length 256, the same number of optimizer steps.
Each run is its own process, started from the command line a user types: `python -m tunesmith train CONFIG`
(which preloads tcmalloc by itself when installed) and a minimal TRL script (`SFTTrainer` with its defaults,
glibc's allocator, which is what a TRL user gets). The two alternate for `--rounds` rounds so a neighbour's
load hits both. Figures: non-padding tokens per second of the training loop (transformers' own
`num_input_tokens_seen` over `train_runtime`, the same counter for both) and the process's peak resident memory
(`wait4`'s ru_maxrss)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = "examples/data/support-chat/train.jsonl"
MODEL = "smollm2-135m-instruct"


def _lora(method: str) -> dict:
    return {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"} \
        if method == "lora" else {"name": "full"}


def _tunesmith_command(out: Path, args) -> list[str]:
    import yaml

    config = {"model": MODEL, "task": "sft", "data": {"train": DATA, "eval_fraction": 0},
              "method": _lora(args.method), "output_dir": str(out / "run"), "max_steps": args.steps,
              "batch_size": 8, "max_length": 256, "learning_rate": 2e-4, "warmup_ratio": 0.0,
              "save_steps": 10_000, "logging_steps": args.steps, "evaluate_before": False}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "tunesmith", "train", str(out / "config.yaml")]


TRL_SCRIPT = r'''
import json, sys
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from tunesmith.models import resolve

out, steps, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
path = resolve("%s")
model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(path)
data = load_dataset("json", data_files="%s", split="train")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM") \
    if method == "lora" else None
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, max_length=256,
                 learning_rate=2e-4, logging_steps=steps, save_strategy="no", report_to="none",
                 include_num_input_tokens_seen="non_padding", use_cpu=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
result = trainer.train()
json.dump({"tokens": trainer.state.num_input_tokens_seen, "seconds": result.metrics["train_runtime"]},
          open(out + "/result.json", "w"))
''' % (MODEL, DATA)


def _run(command: list[str], env: dict) -> tuple[int, float]:
    """(exit code, peak RSS in GB) of one child process."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read()[-3000:])
    return proc.returncode, usage.ru_maxrss / 1024 / 1024  # KiB on Linux


def tunesmith_once(args) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        code, rss = _run(_tunesmith_command(Path(tmp), args), dict(os.environ))
        if code:
            raise SystemExit("tunesmith train failed")
        train = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["train"]
        return train["tokens_seen"] / train["train_runtime"], rss


def trl_once(args) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # TRL as a user runs it: glibc malloc
    with tempfile.TemporaryDirectory() as tmp:
        code, rss = _run([sys.executable, "-c", TRL_SCRIPT, tmp, str(args.steps), args.method], env)
        if code:
            raise SystemExit("the TRL run failed")
        result = json.loads((Path(tmp) / "result.json").read_text())
        return result["tokens"] / result["seconds"], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; {args.method}, "
          f"batch 8, max length 256, {args.steps} steps, {args.rounds} alternating rounds", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {"TRL SFTTrainer": [], "tunesmith train": []}
    for _ in range(args.rounds):
        rows["TRL SFTTrainer"].append(trl_once(args))
        rows["tunesmith train"].append(tunesmith_once(args))
        print("  " + "; ".join(f"{k}: {v[-1][0]:.0f} tok/s, {v[-1][1]:.2f} GB" for k, v in rows.items()), flush=True)
    best = {k: (max(s for s, _ in v), max(m for _, m in v)) for k, v in rows.items()}
    anchor = best["TRL SFTTrainer"]
    print(f"{'':18} {'non-padding tokens/s':>22} {'peak RSS GB':>12} {'speed vs TRL':>13} {'memory vs TRL':>14}")
    for name, (speed, rss) in best.items():
        print(f"{name:18} {' / '.join(f'{s:.0f}' for s, _ in rows[name]):>22} "
              f"{' / '.join(f'{m:.2f}' for _, m in rows[name]):>12} {speed / anchor[0]:12.2f}x "
              f"{rss / anchor[1]:13.2f}x")


if __name__ == "__main__":
    main()
