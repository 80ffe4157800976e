"""lm-evaluation-harness against `tunesmith serve`: its `local-completions` model runs a loglikelihood
(multiple-choice) task and a generate_until task over HTTP, with the prompts as token ids (its default) and
multiple choice scored through `echo` + `logprobs`. The harness's numbers must equal what tunesmith computes
offline on the same model: the choice log-likelihoods from one forward pass, the generations from `generate`.
Tiny local task files and a tiny random model: no hub access."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from serve_assets import uvicorn_on_loopback, write_base

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": [" Paris", " hello", " 4"], "answer": 0},
    {"question": "Q: 2+2?\nA:", "choices": [" 4", " Paris", " great movie"], "answer": 0},
    {"question": "Review: boring. Sentiment:", "choices": [" negative", " positive"], "answer": 0},
    {"question": "Hello! How can I help you", "choices": [" today?", " Paris.", " 4"], "answer": 0},
]


@contextmanager
def serving(engine):
    """Base URL of the OpenAI API of a uvicorn server for `engine` on a free loopback port."""
    from tunesmith.serve import create_app

    try:
        with uvicorn_on_loopback(create_app(engine)) as url:
            yield f"{url}/v1"
    finally:
        engine.stop()


def write_tasks(directory, data):
    """A multiple-choice (loglikelihood) task and a generate_until task over the same local JSONL file."""
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{question}}", "target_delimiter": ""}
    tasks = {
        "tiny_mc": {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
        "tiny_gen": {**common, "output_type": "generate_until", "doc_to_target": "{{choices[answer]}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False,
                                           "temperature": 0},
                     "metric_list": [{"metric": "exact_match"}]},
    }
    import yaml

    for name, task in tasks.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **task}))
    return directory


@pytest.fixture(scope="module")
def setup(bpe, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("lm-eval")
    base = write_base(bpe, root / "base")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tasks").mkdir()
    return base, write_tasks(root / "tasks", data)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(name, "1")
    yield mp
    mp.undo()


def offline_choice_logprobs(base, question: dict) -> list[float]:
    """log P(choice | question) for each choice, summed over the choice's tokens, from one forward pass each
    (the harness splits context and continuation the same way: context tokens, then continuation tokens)."""
    import torch

    from tunesmith.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(base)), load_tokenizer(str(base))
    out = []
    for choice in question["choices"]:
        context = tokenizer(question["question"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(question["question"] + choice, add_special_tokens=False)["input_ids"]
        cont = whole[len(context):] if whole[:len(context)] == context else \
            tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = context + cont
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
    return out


def test_lm_eval_local_completions_runs_loglikelihood_and_generate_until(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tunesmith.generation import SamplingParams, generate
    from tunesmith.models import load
    from tunesmith.serve import load_engine

    base, tasks = setup
    engine = load_engine(str(base))
    name = next(iter(engine.models))
    with serving(engine) as url:
        results = simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/completions", "model": name, "tokenizer": str(base),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1,
                        "max_retries": 1, "max_length": 128},
            tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
            limit=None, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    # Multiple choice: the harness's per-choice log-likelihoods equal the offline forward pass.
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        question = QUESTIONS[sample["doc_id"]]
        got = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sample["resps"]]
        assert got == pytest.approx(offline_choice_logprobs(base, question), abs=1e-3)
    expected_acc = sum(max(range(len(q["choices"])), key=lambda j, q=q: offline_choice_logprobs(base, q)[j])
                       == q["answer"] for q in QUESTIONS) / len(QUESTIONS)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected_acc)
    # generate_until: the harness's generations equal tunesmith's own greedy generation with the same stop.
    model, tokenizer = load(str(base))
    for sample in results["samples"]["tiny_gen"]:
        question = QUESTIONS[sample["doc_id"]]
        offline = generate(model, tokenizer, prompt=question["question"],
                           params=SamplingParams(max_new_tokens=6, stop=["\n"]))
        assert sample["resps"][0][0] == offline.text
