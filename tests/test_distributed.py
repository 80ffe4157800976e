"""Data-parallel training with no change to the config: `torchrun` and `accelerate launch` start 2 CPU processes
(gloo) over the same run directory; they split the batches, and only the main process writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMOLLM2_TEMPLATE, _wrap, build_tiny_llama

BIN = Path(sys.executable).parent
TRAIN_EXAMPLES = 32
BATCH_SIZE = 4
STEPS = 3
RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
             "tokenizer_config.json", "train_config.yaml", "run.json", "log.jsonl", "metrics.json",
             "predictions.jsonl"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, bpe):
    """A tiny Llama directory and chat data (32 train, 4 eval records)."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = _wrap(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    chat = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(TRAIN_EXAMPLES + 4)]
    for name, records in (("train", chat[:TRAIN_EXAMPLES]), ("eval", chat[TRAIN_EXAMPLES:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_config(assets: Path, directory: Path, *, evaluate_before: bool) -> Path:
    config = {"model": str(assets / "tiny"), "data": {"train": str(assets / "train.jsonl"),
                                                      "eval": str(assets / "eval.jsonl")},
              "method": {"name": "lora", "r": 4}, "output_dir": str(directory / "run"), "max_steps": STEPS,
              "batch_size": BATCH_SIZE, "logging_steps": 1, "save_steps": 2,  # a checkpoint mid-run, on every rank
              "evaluate_before": evaluate_before, "eval_max_new_tokens": 4}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread per process on a 2-core machine; no GPU, so that 2 processes never share (or lack) a device.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(command)} timed out\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    assert done.returncode == 0, f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def assert_trained_once_on_two_processes(run: Path, done: subprocess.CompletedProcess, *, evaluate_before: bool):
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no checkpoints/, no metrics_before.json left behind
    assert done.stdout.count("run saved to") == 1, done.stdout  # rank 1 returns without reporting

    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, by rank 0 only
    assert sum("train_runtime" in e for e in entries) == 1
    # The DistributedSampler gives each of the 2 processes half the examples, so an epoch is half as many steps
    # as on one process: step 1 is 1/4 of an epoch here, 1/8 on one process.
    first = next(e for e in entries if e["step"] == 1)
    assert first["epoch"] == pytest.approx(BATCH_SIZE * 2 / TRAIN_EXAMPLES)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["examples"] == TRAIN_EXAMPLES
    assert metrics["after"]["loss"] > 0
    assert ("before" in metrics) == evaluate_before


def test_torchrun_trains_data_parallel_and_writes_the_run_once(assets, tmp_path):
    config = write_config(assets, tmp_path, evaluate_before=True)
    done = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tunesmith", "train",
                   str(config)], tmp_path)
    assert_trained_once_on_two_processes(tmp_path / "run", done, evaluate_before=True)


def test_accelerate_launch_trains_data_parallel(assets, tmp_path):
    # accelerate's own CPU multi-process path (`--cpu --num_processes 2`) goes through mpirun and silently runs
    # ONE process when no --mpirun_hostfile is given. --multi_gpu is its torchrun launcher; with no GPU visible,
    # Trainer places both processes on the CPU with the gloo backend.
    config = write_config(assets, tmp_path, evaluate_before=False)
    done = launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "tunesmith", "train", str(config)], tmp_path)
    assert_trained_once_on_two_processes(tmp_path / "run", done, evaluate_before=False)


def test_a_slow_starting_rank_still_joins_the_run(assets, tmp_path):
    config = write_config(assets, tmp_path, evaluate_before=True)
    script = tmp_path / "slow_rank.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    time.sleep(10)  # a worker that imports slowly on a loaded machine\n"
                      "from tunesmith.cli import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    done = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), "train",
                   str(config)], tmp_path)
    assert_trained_once_on_two_processes(tmp_path / "run", done, evaluate_before=True)
