"""Training throughput (non-padding tokens/s) of the default chat model on the demo chat data, per method.

Run: .venv/bin/python benchmarks/train_throughput.py [--steps 8] [--methods lora full] [--plain-loss]
With tcmalloc (Debian libtcmalloc-minimal4), prefix the command with
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 to compare."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

from tunesmith.training import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--plain-loss", action="store_true", help="logits at every position (the lever off)")
    args = parser.parse_args()
    import resource
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}")
    for method in args.methods:
        with tempfile.TemporaryDirectory() as out:
            run = train({"model": "smollm2-135m-instruct", "task": "sft",
                         "data": {"train": "examples/data/support-chat/train.jsonl", "eval_fraction": 0},
                         "method": {"name": method, **({"r": 16, "alpha": 32} if method == "lora" else {})},
                         "output_dir": f"{out}/run", "max_steps": args.steps, "batch_size": args.batch_size,
                         "learning_rate": 1e-4, "save_steps": 10_000, "evaluate_before": False,
                         "logging_steps": args.steps}, labelled_only=not args.plain_loss)
            t = run.metrics["train"]
            print(f"{method:6} {t['tokens_per_second']:8.1f} non-padding tokens/s  "
                  f"({t['tokens_seen']} tokens in {t['train_runtime']:.1f} s, batch {args.batch_size}, "
                  f"{t['trainable_parameters']:,} trainable; peak RSS so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB)")


if __name__ == "__main__":
    main()
