"""The measurement behind docs/backends.md: candidate CPU engines decoding the same model and prompt, called
directly (no server): batch 1 (one greedy reply) and 16 replies at once. llama.cpp runs the embedded GGUF (Q4_1)
through llama-cpp-python's `Llama` (batch 1) and tunesmith's llama-cpp engine (16 rows in one llama_decode per
step); CTranslate2 runs the model converted by its transformers converter (int8 and float32), batch 1 with
`generate_tokens` and 16 with `generate_batch`.

    PYTHONPATH=/path/to/ctranslate2 .venv/bin/python benchmarks/backend_choice.py [--max-tokens 128]

CTranslate2 is not a tunesmith dependency: install it beside (`pip install --target DIR ctranslate2==4.8.5`) and
put DIR on PYTHONPATH; without it its rows are skipped. Every reply is exactly --max-tokens tokens (the stop
tokens banned); tokens/s is the whole call (prefill included), best of --repeats after a warm-up."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = [{"role": "user", "content": "Tell me a long story about a cat who learns to sail."}]
THREADS = len(os.sched_getaffinity(0))


def best(fn, repeats: int) -> float:
    fn()
    return max(fn() for _ in range(repeats))


def llama_cpp_rows(model: str, ids: list[int], stops: list[int], n: int, repeats: int) -> dict:
    from llama_cpp import Llama

    from tunesmith.generation import Request
    from tunesmith.models import embedded_gguf
    from tunesmith.serve.backends import load_gguf_engine

    llm = Llama(model_path=str(embedded_gguf(model)), n_ctx=2048, n_threads=THREADS, verbose=False)

    def one() -> float:
        start = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=n, temperature=0, logit_bias={t: -100.0 for t in stops})
        return out["usage"]["completion_tokens"] / (time.perf_counter() - start)

    engine = load_gguf_engine(model, max_batch=16)
    engine.threaded = False

    def sixteen() -> float:
        events = []
        engine.submit([Request(model, ids, n, events.append, temperature=0, logit_bias={t: -100.0 for t in stops})
                       for _ in range(16)])
        start = time.perf_counter()
        while engine.busy:
            engine.step()
        return sum(e.completion_tokens for e in events) / (time.perf_counter() - start)

    return {"llama.cpp Q4_1 (llama-cpp-python)": (best(one, repeats), best(sixteen, repeats))}


def ctranslate2_rows(model: str, ids: list[int], stops: list[int], n: int, repeats: int) -> dict:
    import ctranslate2

    from tunesmith.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(model)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    rows = {}
    for quant in ("int8", "float32"):
        out = Path(tempfile.gettempdir()) / f"ct2-{model}-{quant}"
        if not out.is_dir():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ctranslate2.converters.transformers", "--model", resolve(model),
                            "--output_dir", str(out), "--quantization", quant], check=True, capture_output=True)
            print(f"CTranslate2 {quant} conversion: {time.perf_counter() - start:.1f} s", flush=True)
        generator = ctranslate2.Generator(str(out), device="cpu", compute_type=quant, intra_threads=THREADS)
        ban = [tokenizer.convert_ids_to_tokens(t) for t in stops]

        def one() -> float:
            start = time.perf_counter()
            count = sum(1 for _ in generator.generate_tokens(tokens, max_length=n, sampling_topk=1, end_token=[],
                                                             suppress_sequences=[[t] for t in ban]))
            return count / (time.perf_counter() - start)

        def sixteen() -> float:
            start = time.perf_counter()
            results = generator.generate_batch([tokens] * 16, max_length=n, sampling_topk=1, end_token=[],
                                               include_prompt_in_result=False,
                                               suppress_sequences=[[t] for t in ban])
            return sum(len(r.sequences_ids[0]) for r in results) / (time.perf_counter() - start)

        rows[f"CTranslate2 {quant}"] = (best(one, repeats), best(sixteen, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tunesmith.data.tokenize import encode_chat_prompt, stop_token_ids
    from tunesmith.models import load_generation_config, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    stops = sorted(stop_token_ids(tokenizer, load_generation_config(args.model)))
    ids = encode_chat_prompt(tokenizer, QUESTION)
    rows = llama_cpp_rows(args.model, ids, stops, args.max_tokens, args.repeats)
    if importlib.util.find_spec("ctranslate2") is not None:
        rows.update(ctranslate2_rows(args.model, ids, stops, args.max_tokens, args.repeats))
    print(f"{THREADS} threads, load average {os.getloadavg()[0]:.1f}; {args.model}, prompt {len(ids)} tokens, "
          f"{args.max_tokens} tokens per reply, best of {args.repeats}")
    print(f"{'engine':36} {'batch 1 tok/s':>13} {'16 at once tok/s':>16}")
    for name, (one, sixteen) in rows.items():
        print(f"{name:36} {one:13.1f} {sixteen:16.1f}")


if __name__ == "__main__":
    main()
