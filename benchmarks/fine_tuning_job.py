"""The `make demo` recipe as a fine-tuning job through the server's OpenAI API, on the embedded model: the same
before/after scores as `tunesmith train examples/chat-lora.yaml`, and what the job adds around the training (upload,
validation and queue, the trainer process starting and loading, the run loaded live).

    .venv/bin/python benchmarks/fine_tuning_job.py [--state-dir DIR]

Uploads examples/data/support-chat/train.jsonl and test.jsonl, creates a job with the recipe's settings in the
`tunesmith` extension field (method, learning rate, 40 steps, max_length, eval tokens), polls its events to the
end, prints the run's before/after metrics.json rows and the times, then chats once with the `ft:` model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from served import served  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


def recipe() -> dict:
    """examples/chat-lora.yaml's settings, as the job's `tunesmith` field (the job sets model, data and output)."""
    cfg = yaml.safe_load((ROOT / "examples" / "chat-lora.yaml").read_text())
    for key in ("model", "task", "data", "output_dir"):
        cfg.pop(key, None)
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from openai import OpenAI

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="tunesmith-job-"))
    started = time.perf_counter()
    with served("smollm2-135m-instruct", "--api-key", KEY, "--state-dir", str(state)) as url:
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        up = time.perf_counter()
        data = ROOT / "examples" / "data" / "support-chat"
        train = client.files.create(file=(data / "train.jsonl").open("rb"), purpose="fine-tune")
        valid = client.files.create(file=(data / "test.jsonl").open("rb"), purpose="fine-tune")
        uploaded = time.perf_counter()
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=train.id,
                                             validation_file=valid.id, suffix="demo",
                                             extra_body={"tunesmith": recipe()})
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
        finished = time.perf_counter()
        events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
        print(f"job {job.id}: {job.status}" + (f" ({job.error.message})" if job.error else ""))
        run = Path(job.tunesmith["run"])
        metrics = json.loads((run / "metrics.json").read_text())
        for name in ("exact_match", "loss"):
            print(f"  {name:12} before {metrics['before'][name]:.4f}  after {metrics['after'][name]:.4f}")
        train_s = metrics["train"]["wall_seconds"]
        print(f"  server start {up - started:.1f} s, two uploads {uploaded - up:.1f} s, job create -> done "
              f"{finished - uploaded:.1f} s, of which training {train_s:.1f} s; events: {len(events)}")
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=40, temperature=0, messages=[
            {"role": "user", "content": "Hi, my order NW-48213 never arrived, can I get my money back?"}])
        print(f"  {job.fine_tuned_model}: {reply.choices[0].message.content!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
