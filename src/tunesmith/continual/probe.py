"""General-ability retention: a small probe of everyday prompts shipped with tunesmith (probe.jsonl: facts,
arithmetic, a translation, short writing), answered once by the untrained model (greedy). After every step the
adapted model is scored on the untrained model's own answers, so drift shows even where no earlier task exists:

- mean_logprob: the mean log-probability per answer token (with the training mask: the answer and its
  end-of-turn token), -loss; it falls as the model moves away from what it used to say;
- reproduced: the share of prompts whose greedy answer is still exactly the untrained model's."""

from __future__ import annotations

import json
from importlib.resources import files

from ..generation import SamplingParams, generate_batch


def probe_prompts() -> list[dict]:
    """The shipped probe: chat records holding one user message each."""
    text = files("tunesmith.continual").joinpath("probe.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def reference_answers(model, tokenizer, *, max_new_tokens: int = 32, chat_template: str | None = None,
                      prompts: list[dict] | None = None) -> list[dict]:
    """The probe with `model`'s greedy answers appended as the assistant turn."""
    prompts = prompts or probe_prompts()
    outputs = generate_batch(model, tokenizer, prompts, params=SamplingParams(max_new_tokens=max_new_tokens),
                             chat_template=chat_template)
    return [{"messages": [*p["messages"], {"role": "assistant", "content": out.text}]}
            for p, out in zip(prompts, outputs)]


def score_probe(model, tokenizer, reference: list[dict], *, max_new_tokens: int = 32,
                chat_template: str | None = None) -> dict:
    """{"mean_logprob", "reproduced", "prompts"} of `model` against the reference answers (see the module
    docstring); `max_new_tokens` must be the references' own, so an answer cut at the limit is cut alike."""
    from ..evaluation import evaluate_generation

    result = evaluate_generation(model, tokenizer, reference, chat_template=chat_template,
                                 params=SamplingParams(max_new_tokens=max_new_tokens), desc="probe")
    return {"mean_logprob": -result.metrics["loss"], "reproduced": result.metrics["exact_match"],
            "prompts": len(reference)}
