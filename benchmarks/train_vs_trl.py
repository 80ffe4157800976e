"""`tunesmith train` against TRL's `SFTTrainer`, each as a user runs it, side by side in one run.

    .venv/bin/pip install -e '.[bench]'        # datasets for TRL's SFTTrainer (trl itself is a runtime dependency)
    .venv/bin/python benchmarks/train_vs_trl.py [--steps 12] [--rounds 2] [--method lora|full] [--model PATH]

Same data (examples/data/support-chat/train.jsonl), same model (smollm2-135m-instruct), same LoRA (r 16, alpha 32,
all linear layers, dropout 0) or full fine-tuning, batch 8, max length 256, the same number of optimizer steps.
Each run is its own process, started from the command line a user types: `python -m tunesmith train CONFIG`
(which preloads tcmalloc by itself when installed) and a minimal TRL script (`SFTTrainer` with its defaults,
glibc's allocator, which is what a TRL user gets). The two alternate for `--rounds` rounds so a neighbour's
load hits both. Figures: non-padding tokens per second of the training loop (transformers' own
`num_input_tokens_seen` over `train_runtime`, the same counter for both) and the process's peak resident memory
(`wait4`'s ru_maxrss). On a CUDA machine both train on the GPU (each with its own defaults: TRL's bf16 autocast,
tunesmith's bf16 frozen base) and the peak GPU memory (NVML, the device's used memory above its idle level while
the run's process lives) is reported beside the RSS."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

DATA = "examples/data/support-chat/train.jsonl"
MODEL = "smollm2-135m-instruct"


def _lora(method: str) -> dict:
    return {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"} \
        if method == "lora" else {"name": "full"}


def _tunesmith_command(out: Path, args) -> list[str]:
    import yaml

    config = {"model": args.model, "task": "sft", "data": {"train": DATA, "eval_fraction": 0},
              "method": _lora(args.method), "output_dir": str(out / "run"), "max_steps": args.steps,
              "batch_size": 8, "max_length": 256, "learning_rate": 2e-4, "warmup_ratio": 0.0,
              "save_steps": 10_000, "logging_steps": args.steps, "evaluate_before": False}
    for item in args.set:  # e.g. --set recompute=false: a tunesmith setting other than its default
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "tunesmith", "train", str(out / "config.yaml")]


TRL_SCRIPT = r'''
import json, sys
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from tunesmith.models import resolve

out, steps, method, model_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
path = resolve(model_name)
model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(path)
data = load_dataset("json", data_files="%s", split="train")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM") \
    if method == "lora" else None
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, max_length=256,
                 learning_rate=2e-4, logging_steps=steps, save_strategy="no", report_to="none",
                 include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
result = trainer.train()
json.dump({"tokens": trainer.state.num_input_tokens_seen, "seconds": result.metrics["train_runtime"]},
          open(out + "/result.json", "w"))
''' % DATA


class GpuPeak:
    """The device's used memory above its level before the run, sampled every 50 ms (NVML) while it runs."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.idle = self._used()
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._used() - self.idle)
            time.sleep(0.05)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 1024 ** 3


def run_child(command: list[str], env: dict) -> tuple[int, float, float | None]:
    """(exit code, peak RSS in GB, peak GPU memory in GB or None) of one child process."""
    gpu = GpuPeak() if cuda() else None
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read()[-3000:])
    return proc.returncode, usage.ru_maxrss / 1024 / 1024, gpu.stop() if gpu else None  # ru_maxrss: KiB


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tunesmith_once(args) -> tuple[float, float, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        code, rss, gpu = run_child(_tunesmith_command(Path(tmp), args), dict(os.environ))
        if code:
            raise SystemExit("tunesmith train failed")
        train = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["train"]
        return train["tokens_seen"] / train["train_runtime"], rss, gpu


def run_trl(script: str, arguments: Callable[[Path], list[str]]) -> tuple[float, float, float | None]:
    """(tokens/s, peak RSS GB, peak GPU GB or None) of `python -c script TMP *arguments(TMP)`, a TRL script that
    writes TMP/result.json: {"tokens": non-padding tokens trained on, "seconds": train_runtime}."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # TRL as a user runs it: glibc malloc
    with tempfile.TemporaryDirectory() as tmp:
        code, rss, gpu = run_child([sys.executable, "-c", script, tmp, *arguments(Path(tmp))], env)
        if code:
            raise SystemExit("the TRL run failed")
        result = json.loads((Path(tmp) / "result.json").read_text())
        return result["tokens"] / result["seconds"], rss, gpu


def trl_once(args) -> tuple[float, float, float | None]:
    return run_trl(TRL_SCRIPT, lambda tmp: [str(args.steps), args.method, args.model])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--model", default=MODEL, help="embedded name or model directory (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a tunesmith config setting for its runs (default: tunesmith's defaults)")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    device = f"GPU {torch.cuda.get_device_name(0)}" if cuda() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}, load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; {args.method}, "
          f"batch 8, max length 256, {args.steps} steps, {args.rounds} alternating rounds"
          + (f"; tunesmith with {' '.join(args.set)}" if args.set else ""), flush=True)
    rows: dict[str, list[tuple[float, float, float | None]]] = {"TRL SFTTrainer": [], "tunesmith train": []}
    for _ in range(args.rounds):
        rows["TRL SFTTrainer"].append(trl_once(args))
        rows["tunesmith train"].append(tunesmith_once(args))
        print_round(rows)
    table(rows, "TRL SFTTrainer")


def print_round(rows: dict[str, list[tuple[float, float, float | None]]]) -> None:
    """The latest round of each tool: (tokens/s, peak RSS GB, peak GPU GB or None)."""
    print("  " + "; ".join(f"{k}: {v[-1][0]:.0f} tok/s, {v[-1][1]:.2f} GB RSS"
                           + (f", {v[-1][2]:.2f} GB GPU" if v[-1][2] is not None else "")
                           for k, v in rows.items()), flush=True)


def table(rows: dict[str, list[tuple[float, float, float | None]]], anchor_name: str,
          speed_heading: str = "non-padding tokens/s") -> None:
    """Every round of each tool, and its best against `anchor_name`'s."""
    gpu = cuda()
    # Speed: each tool's best round (noise only slows a run down); memory: its largest peak.
    best = {k: (max(r[0] for r in v), max(r[2] if gpu else r[1] for r in v)) for k, v in rows.items()}
    anchor = best[anchor_name]
    memory = "peak GPU GB" if gpu else "peak RSS GB"
    width = max(18, max(map(len, rows)) + 2)
    print(f"{'':{width}} {speed_heading:>22} {'peak RSS GB':>12}" + (f" {memory:>12}" if gpu else "")
          + f" {'speed vs TRL':>13} {'memory vs TRL':>14}")
    for name, (speed, peak) in best.items():
        print(f"{name:{width}} {' / '.join(f'{r[0]:.0f}' for r in rows[name]):>22} "
              f"{' / '.join(f'{r[1]:.2f}' for r in rows[name]):>12}"
              + (f" {' / '.join(f'{r[2]:.2f}' for r in rows[name]):>12}" if gpu else "")
              + f" {speed / anchor[0]:12.2f}x {peak / anchor[1]:13.2f}x")


if __name__ == "__main__":
    main()
