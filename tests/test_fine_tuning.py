"""Fine-tuning through the server with the official `openai` client against a real `tunesmith serve` on
127.0.0.1 and a tiny model: upload a file, create a job, follow its events to success, chat with the `ft:` model
it serves; a second job cancelled mid-run while a third waits its turn; a bad file refused at upload with its
line; dpo refused at validation while tunesmith has no preference training; the routes off without a key or with
--fine-tuning off. A server killed with -9 while a job trains takes its trainer with it, and the restarted server
resumes the job from its last checkpoint, then serves the result. Jobs train a few steps (max_steps)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from serve_assets import write_base

KEY = "test-key"
FAST = {"max_steps": 3, "logging_steps": 1, "evaluate_before": False, "data": {"eval_fraction": 0}}
CHAT = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@contextmanager
def serving(base: Path, state: Path, *flags: str):
    """(url, process) of `tunesmith serve` over `base` with fine-tuning state in `state`, until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (state.parent / "key").write_text(KEY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", str(base), "--port", str(port),
                             "--api-key-file", str(state.parent / "key"), "--state-dir", str(state),
                             "--conversations", str(state.parent / "c.sqlite"), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.2)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(check, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def trainers(config: Path) -> list[int]:
    """Pids of the processes whose command line holds `config` (a job's trainer)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(config).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def done(client, jid: str):
    job = client.fine_tuning.jobs.retrieve(jid)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


@pytest.fixture(scope="module")
def assets(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "base": write_base(bpe, root / "base"), "chat": _jsonl(root / "chat.jsonl", CHAT)}


@pytest.fixture(scope="module")
def server(assets):
    with serving(assets["base"], assets["root"] / "state") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_upload_train_and_chat_with_the_fine_tuned_model(client, assets):
    with assets["chat"].open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert (uploaded.object, uploaded.filename, uploaded.purpose, uploaded.bytes) == (
        "file", "chat.jsonl", "fine-tune", assets["chat"].stat().st_size)
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).content == assets["chat"].read_bytes()

    job = client.fine_tuning.jobs.create(
        model=str(assets["base"]), training_file=uploaded.id, suffix="mine",
        method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}}},
        extra_body={"tunesmith": FAST})
    assert job.status == "queued" and job.seed == 42 and job.hyperparameters.learning_rate_multiplier == 2
    config = yaml.safe_load((Path(job.tunesmith["run"]).parent / "config.yaml").read_text())
    # 2 x the default rate of LoRA on this 43k-parameter base (training/defaults.py: 1e-3 x (135M / 43k)^0.25 = 7e-3)
    assert config["learning_rate"] == 0.014 and config["max_steps"] == 3 and "epochs" not in config

    job = wait_for(lambda: done(client, job.id), "the job to finish")
    assert job.status == "succeeded", client.fine_tuning.jobs.list_events(job.id).data[0].message
    assert job.fine_tuned_model == f"ft:base:mine:{job.id}" and job.trained_tokens > 0
    messages = [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))]
    assert messages[:5] == [f"Created fine-tuning job: {job.id}", f"Validating training file: {uploaded.id}",
                            "Files validated, moving job to queued state", "Fine-tuning job started",
                            messages[4]]
    assert [m.split(":")[0] for m in messages[4:7]] == ["Step 1/3", "Step 2/3", "Step 3/3"]
    assert messages[-2:] == [f"New fine-tuned model created: {job.fine_tuned_model}",
                             "The job has successfully completed"]
    step = client.fine_tuning.jobs.list_events(job.id, limit=100).data[-5]
    assert step.type == "metrics" and step.data["step"] == 1 and step.data["train_loss"] > 0

    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "What is 3+3?"}])
    assert reply.model == job.fine_tuned_model and reply.choices[0].finish_reason in ("stop", "length")
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert (checkpoint.step_number, checkpoint.fine_tuned_model_checkpoint) == (3, job.fine_tuned_model)


def test_a_job_is_cancelled_mid_run_while_the_next_one_waits(client, assets):
    uploaded = client.files.create(file=assets["chat"].open("rb"), purpose="fine-tune")
    long = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id,
                                          extra_body={"tunesmith": {**FAST, "max_steps": 500}})
    waiting = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id, extra_body={"tunesmith": FAST})
    wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id)), "a step")
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"  # --max-train-jobs 1
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"

    config = Path(long.tunesmith["run"]).parent / "config.yaml"
    assert trainers(config)
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    wait_for(lambda: not trainers(config), "the trainer to end", timeout=30)
    time.sleep(1.5)  # the runner has seen the process end by now: the job stays cancelled, not failed
    job = client.fine_tuning.jobs.retrieve(long.id)
    assert (job.status, job.fine_tuned_model, job.error) == ("cancelled", None, None)
    assert client.fine_tuning.jobs.list_events(long.id).data[0].message == "The job was cancelled"
    assert [j.status for j in client.fine_tuning.jobs.list(limit=2).data] == ["cancelled", "cancelled"]

    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="has already cancelled: only a queued or running job"):
        client.fine_tuning.jobs.cancel(long.id)


def test_a_bad_file_is_refused_at_upload_with_its_line(client, assets):
    from openai import BadRequestError

    good = json.dumps(CHAT[0])
    bad = _jsonl(assets["root"] / "bad.jsonl", [good, '{"messages": [{"role": "user"}]}', good, "{not json"])
    with pytest.raises(BadRequestError) as caught:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    error = caught.value.body
    assert (error["param"], error["code"]) == ("file", "invalid_file")
    assert error["message"].startswith("bad.jsonl is not valid training data (2 problems; `tunesmith data validate` "
                                       "shows the same): bad.jsonl:2: ")
    assert "; bad.jsonl:4: " in error["message"]
    assert "bad.jsonl" not in [f.filename for f in client.files.list()]


PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
          "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
          "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I think."}]} for i in range(8)]


def test_a_dpo_job_trains_preference_pairs_and_refuses_other_data(client, assets, tmp_path):
    pairs = client.files.create(file=_jsonl(tmp_path / "pairs.jsonl", PAIRS).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=pairs.id, suffix="pref",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                                         extra_body={"tunesmith": FAST})
    config = yaml.safe_load((Path(job.tunesmith["run"]).parent / "config.yaml").read_text())
    assert config["task"] == "preference" and config["preference"] == {"objective": "dpo", "beta": 0.2}
    job = wait_for(lambda: done(client, job.id), "the dpo job to finish")
    assert job.status == "succeeded", client.fine_tuning.jobs.list_events(job.id).data[0].message
    assert job.fine_tuned_model == f"ft:base:pref:{job.id}"
    assert job.fine_tuned_model in [m.id for m in client.models.list()]

    chat = client.files.create(file=assets["chat"].open("rb"), purpose="fine-tune")
    refused = client.fine_tuning.jobs.create(model="base", training_file=chat.id, method={"type": "dpo"})
    assert refused.status == "failed" and refused.error.param == "training_file"
    assert refused.error.message == (f"training_file {chat.id} holds chat records; dpo trains on preference pairs "
                                     "(prompt, chosen, rejected; or OpenAI's input, preferred_output, "
                                     "non_preferred_output).")


def test_requests_the_server_cannot_honour_are_400s_naming_the_field(client, assets):
    from openai import BadRequestError, NotFoundError

    uploaded = client.files.create(file=assets["chat"].open("rb"), purpose="fine-tune")
    cases = [({"model": "gpt-4o-mini"}, "model", "cannot be fine-tuned here: this server fine-tunes the model"),
             ({"training_file": "file-0"}, "training_file", "invalid training_file: file-0 (no such file"),
             ({"method": {"type": "reinforcement"}}, "method.type", "Reinforcement fine-tuning is not supported"),
             ({"extra_body": {"tunesmith": {"output_dir": "/tmp/x"}}}, "tunesmith.output_dir", "is set by the job"),
             ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "greater than or equal to 1")]
    for change, param, says in cases:
        with pytest.raises(BadRequestError, match=re.escape(says)) as caught:
            client.fine_tuning.jobs.create(**{"model": "base", "training_file": uploaded.id, **change})
        assert caught.value.body["param"] == param
    with pytest.raises(NotFoundError, match=re.escape("No such File object: file-0")):
        client.files.retrieve("file-0")
    with pytest.raises(BadRequestError, match=re.escape("purpose must be 'fine-tune', not 'batch'")):
        client.files.create(file=assets["chat"].open("rb"), purpose="batch")
    assert client.files.delete(uploaded.id).deleted
    assert uploaded.id not in [f.id for f in client.files.list()]


@pytest.mark.parametrize("settings, says", [
    ({}, "Fine-tuning needs an API key, since it trains and keeps files on the server's machine: start the server "
         "with --api-key-file FILE"),
    ({"api_key": KEY, "fine_tuning": False}, "Fine-tuning is turned off on this server (tunesmith serve "
                                             "--fine-tuning off).")])
def test_the_routes_are_off_without_a_key_or_when_turned_off(assets, tmp_path, settings, says):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    engine = load_engine(str(assets["base"]))
    app = create_app(engine, ServeSettings(state_dir=str(tmp_path), **settings))
    with TestClient(app) as http:
        for method, path in [("GET", "/v1/files"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs")]:
            answer = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert answer.status_code == 403 and answer.json()["error"]["message"].startswith(says)
    assert not (tmp_path / "jobs.sqlite").exists()


def test_an_upload_over_the_limit_is_a_413(assets, tmp_path):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    app = create_app(load_engine(str(assets["base"])), ServeSettings(api_key=KEY, state_dir=str(tmp_path),
                                                                     max_upload_bytes=1000))
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as http:
        answer = http.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                           files={"file": ("big.jsonl", assets["chat"].read_bytes())})
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "file_too_large"
        assert http.get("/v1/files", headers=headers).json()["data"] == []


def test_a_job_whose_server_stops_too_often_fails_with_the_reason(tmp_path):
    from tunesmith.serve.finetune import Runner
    from tunesmith.serve.finetune.runner import MAX_RESTARTS
    from tunesmith.serve.finetune.store import Job

    record = {"id": "ftjob-1", "created_at": 0, "status": "running", "fine_tuned_model": None}

    async def restart(notes: dict) -> tuple[dict, str]:
        runner = Runner(tmp_path, engine=None, lock=asyncio.Lock())
        runner.store.add(Job(dict(record, id=f"ftjob-{notes['restarts']}"), notes))
        await runner.start()  # the loop has not run yet: nothing is launched before stop()
        job = runner.store.get(f"ftjob-{notes['restarts']}")
        event = runner.store.events(job.id)[0]["message"]
        await runner.stop()
        return job.record, event

    record_0, event_0 = asyncio.run(restart({"restarts": 0, "pid": None}))
    assert record_0["status"] == "queued"
    assert event_0 == ("The server stopped while this job was training, before its first checkpoint; it starts "
                       "again.")
    failed, event = asyncio.run(restart({"restarts": MAX_RESTARTS, "pid": None}))
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_stopped"
    assert event.startswith(f"The job failed: The server stopped while this job was training, {MAX_RESTARTS + 1} "
                            "times; create the job again")


def test_a_server_killed_mid_job_resumes_it_from_its_last_checkpoint(assets, tmp_path):
    from openai import OpenAI

    state = tmp_path / "state"
    with serving(assets["base"], state) as (url, proc):
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        uploaded = client.files.create(file=assets["chat"].open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id, suffix="again",
                                             extra_body={"tunesmith": {**FAST, "max_steps": 40, "save_steps": 2}})
        wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, "a checkpoint")
        config = Path(job.tunesmith["run"]).parent / "config.yaml"
        assert trainers(config)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not trainers(config), "the trainer to die with its server", timeout=15)

    with serving(assets["base"], state) as (url, _):
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        resumed = next(m for m in messages if m.startswith("The server stopped"))
        assert resumed.startswith("The server stopped while this job was training; it resumes from checkpoint-")
        job = wait_for(lambda: done(client, job.id), "the resumed job to finish")
        assert job.status == "succeeded" and "Fine-tuning job resumed" in [
            e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        steps = [e["step"] for e in map(json.loads, (Path(job.tunesmith["run"]) / "log.jsonl").open()) if "loss" in e]
        assert steps == list(range(1, 41))
        assert job.fine_tuned_model in {m.id for m in client.models.list()}

    with serving(assets["base"], state) as (url, _):  # a finished job's model is served after a restart
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.model == job.fine_tuned_model


def test_an_upload_that_is_not_well_formed_multipart_is_a_400_naming_it():
    """The body is parsed by python-multipart: what it cannot read is refused in one sentence, not a 500."""
    from tunesmith.serve.finetune.files import FileRefused, parse_form

    boundary = "b0undary"
    good = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../a b.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n{\"x\": 1}\n\r\n"
            f"--{boundary}--\r\n").encode()
    fields = parse_form(good, f"multipart/form-data; boundary={boundary}")
    assert fields == {"purpose": (None, b"fine-tune"), "file": ("../../a b.jsonl", b'{"x": 1}\n')}
    with pytest.raises(FileRefused, match="multipart/form-data"):
        parse_form(good, "application/json")
    with pytest.raises(FileRefused, match="malformed"):
        parse_form(b"--b0undary\r\nno headers end here", f"multipart/form-data; boundary={boundary}")
