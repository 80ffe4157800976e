"""Which grammar library backs `response_format` (json_object / json_schema): xgrammar, llguidance or
outlines-core, measured on the default model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens).

For each library installed here: time to build the tokenizer info, to compile (a) any JSON and (b) a JSON
schema with nested objects, enums, arrays and required fields, to the first mask, and per token (a fixed
121-token JSON document forced through the matcher, the same tokens for every library); then correctness:
the real model decodes greedily and sampled under each mask, and every output must parse (and validate
against the schema). Libraries that are not installed are skipped, so it runs on tunesmith's own venv (the
chosen library) and on a scratch venv holding all three (see grammar_choice.md).

Run: .venv/bin/python benchmarks/grammar_choice.py [--libraries llguidance xgrammar outlines-core]
     [--tokenizer DIR] [--generations 4] [--max-new-tokens 300]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {
            "type": "array",
            "items": {"type": "object",
                      "properties": {"subject": {"enum": ["math", "art", "music"]}, "value": {"type": "number"}},
                      "required": ["subject", "value"], "additionalProperties": False},
        },
    },
    "required": ["name", "age", "role", "active", "address", "scores"],
    "additionalProperties": False,
}

# Valid for both grammars; json.dumps' default ", " / ": " separators are what every library's JSON allows.
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "role": "admin", "active": True, "tags": ["math", "poetry", "engines"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
            "scores": [{"subject": "math", "value": 99.5}, {"subject": "art", "value": 87},
                       {"subject": "music", "value": 78.25}]}

# tunesmith.generation.grammar's whitespace between JSON tokens: a space or two, or a line break and indentation
# (each library's unbounded default lets the 135M model loop on blank lines); xgrammar's nearest is a count.
WHITESPACE = r"(?:[\x20\x09]{1,2}|\x0D?\x0A[\x20\x09]{0,32})"

# A one-shot prompt: asked cold, the 135M model mostly loops inside "tags" until max_new_tokens.
PROMPT = f"Here is a person as JSON: {json.dumps(DOCUMENT)}\nDescribe Alan Turing as JSON in the same way."


class XGrammar:
    package = "xgrammar"

    def __init__(self):
        import xgrammar

        self.xgr = xgrammar

    def tokenizer_info(self, tokenizer, vocab_size):
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        return self.xgr.GrammarCompiler(info, max_threads=2)

    def compile(self, compiler, schema):
        return compiler.compile_json_schema(json.dumps(schema or {"type": "object"}), strict_mode=True,
                                            max_whitespace_cnt=34)

    def matcher(self, compiler, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask, 0)

    def advance(self, matcher, token):
        return matcher.accept_token(token)


class LLGuidance:
    package = "llguidance"

    def __init__(self):
        import llguidance
        import llguidance.hf

        self.llg = llguidance

    def tokenizer_info(self, tokenizer, vocab_size):
        return self.llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, tokenizer_info, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                              defaults={"whitespace_pattern": WHITESPACE})
        error = self.llg.LLMatcher.validate_grammar(grammar, tokenizer_info)
        assert not error, error
        return grammar

    def matcher(self, tokenizer_info, compiled):
        return self.llg.LLMatcher(tokenizer_info, compiled)

    def fill(self, matcher, bitmask):
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, matcher, token):
        return matcher.consume_token(token)


class OutlinesCore:
    """No context-free grammars: JSON becomes a regex (nesting unrolled to a fixed depth) and the regex a
    token-level DFA over the whole vocabulary, built eagerly."""

    package = "outlines-core"

    def __init__(self):
        import outlines_core

        self.oc = outlines_core

    def tokenizer_info(self, tokenizer, vocab_size):
        # Vocabulary.from_pretrained only fetches from the hub, so map each byte-level token to its bytes.
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        vocabulary = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id not in specials:
                vocabulary.setdefault(bytes(unicode_to_byte[c] for c in token), []).append(token_id)
        return self.oc.Vocabulary(tokenizer.eos_token_id, vocabulary)

    def compile(self, vocabulary, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema or {"type": "object"}))
        return self.oc.Index(regex, vocabulary)

    def matcher(self, vocabulary, compiled):
        return self.oc.Guide(compiled)

    def fill(self, guide, bitmask):
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, guide, token):
        guide.advance(token, return_tokens=False)
        return True


BACKENDS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def unpack(bitmask, vocab_size):
    """int32 bitmask [ceil(V/32)] -> bool [V] (what tunesmith's Constraint.allowed() returns); bit i of word
    w is token 32*w + i, so the little-endian bytes unpack in token order."""
    import numpy as np
    import torch

    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(bits).view(torch.bool)


def seconds(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def check(value, schema) -> list[str]:
    """Validation errors of `value` against `schema`: jsonschema when installed, else a hand check of the
    keywords SCHEMA uses."""
    if importlib.util.find_spec("jsonschema"):
        import jsonschema

        return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(value)]
    errors = []
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float), "integer": int}
    if kind and (not isinstance(value, types[kind]) or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{value!r} is not one of {schema['enum']}")
    if kind == "integer" and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{value} is out of range")
    if kind == "object":
        errors += [f"{key!r} is a required property" for key in schema.get("required", ()) if key not in value]
        for key, item in value.items():
            if key in schema.get("properties", {}):
                errors += check(item, schema["properties"][key])
            elif schema.get("additionalProperties") is False:
                errors.append(f"unexpected key {key!r}")
    if kind == "array":
        errors += [error for item in value for error in check(item, schema.get("items", {}))]
    return errors


def measure(backend, tokenizer, vocab_size, model, generations, max_new_tokens) -> dict:
    import torch

    row = {"version": importlib.metadata.version(backend.package)}
    info, row["tokenizer info (s)"] = seconds(lambda: backend.tokenizer_info(tokenizer, vocab_size))
    document = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False) + [tokenizer.eos_token_id]
    row["document tokens"] = len(document)
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    for label, schema in (("any JSON", None), ("schema", SCHEMA)):
        compiled, row[f"compile {label} (s)"] = seconds(lambda: backend.compile(info, schema))
        matcher = backend.matcher(info, compiled)
        _, row[f"first mask {label} (ms)"] = seconds(lambda: backend.fill(matcher, bitmask))
        row[f"first mask {label} (ms)"] *= 1e3
        fills, unpacked = [], []
        for token in document:
            _, took = seconds(lambda: backend.fill(matcher, bitmask))
            mask, unpack_took = seconds(lambda: unpack(bitmask, vocab_size))
            fills.append(took)
            unpacked.append(took + unpack_took)
            eos_allowed = bool(mask[tokenizer.eos_token_id])
            assert eos_allowed == (token == tokenizer.eos_token_id), f"{backend.package}: EOS allowed={eos_allowed}"
            assert mask[token], f"{backend.package} {label}: document token {token} masked"
            if token != tokenizer.eos_token_id:
                assert backend.advance(matcher, token) is not False
        row[f"mask {label} mean (ms)"] = statistics.mean(fills[1:]) * 1e3
        row[f"mask {label} max (ms)"] = max(fills[1:]) * 1e3
        row[f"mask+unpack {label} mean (ms)"] = statistics.mean(unpacked[1:]) * 1e3
        if model is not None:
            row[f"valid/finished/runs {label}"], row[f"gen mask {label} mean (ms)"] = generate(
                backend, info, compiled, tokenizer, model, vocab_size, schema, generations, max_new_tokens)
    return row


def generate(backend, info, compiled, tokenizer, model, vocab_size, schema, generations, max_new_tokens):
    """Decode with the real model under the mask (run 0 greedy, the others sampled at temperature 0.7).
    Returns ('valid/finished/runs', mean mask ms): a run that hits max_new_tokens has not finished its JSON,
    which is the model's doing (it loops), not the library's; every token it took must still be accepted."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    from transformers import DynamicCache

    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    valid = finished = 0
    took = []
    for run in range(generations):
        generator = torch.Generator().manual_seed(run)
        matcher = backend.matcher(info, compiled)
        ids, cache, out, done = prompt, DynamicCache(config=model.config), [], False
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                start = time.perf_counter()
                backend.fill(matcher, bitmask)
                mask = unpack(bitmask, vocab_size)
                took.append(time.perf_counter() - start)
                logits = logits.masked_fill(~mask, float("-inf"))
                probs = (logits / 0.7).softmax(-1)
                token = int(logits.argmax() if run == 0 else torch.multinomial(probs, 1, generator=generator))
                if token == tokenizer.eos_token_id:
                    done = True
                    break
                assert backend.advance(matcher, token) is not False, f"{backend.package} rejected its own token"
                out.append(token)
                ids = torch.tensor([[token]])
        text = tokenizer.decode(out)
        if done:
            finished += 1
            try:
                errors = check(json.loads(text), schema or {"type": "object"})
            except json.JSONDecodeError as error:
                errors = [str(error)]
            valid += not errors
        verdict = ("valid" if not errors else f"INVALID {errors[:2]}") if done else "hit max_new_tokens"
        print(f"  [{backend.package} {'schema' if schema else 'any JSON'} run {run}] {len(out)} tokens, {verdict}: "
              f"{text[:120]!r}")
    return f"{valid}/{finished}/{generations}", statistics.mean(took) * 1e3


def measure_tunesmith(tokenizer, vocab_size) -> dict:
    """What ships: tunesmith.generation.grammar.Constraint (llguidance, tunesmith's whitespace, cached)."""
    from tunesmith.generation.grammar import Constraint

    row = {"version": "Constraint"}
    document = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    for label, schema in (("any JSON", None), ("schema", SCHEMA)):
        response_format = ({"type": "json_object"} if schema is None else
                           {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
        _, row[f"first Constraint {label} (s)"] = seconds(lambda: Constraint(tokenizer, response_format, vocab_size))
        constraint, row[f"next Constraint {label} (ms)"] = seconds(lambda: Constraint(tokenizer, response_format,
                                                                                      vocab_size))
        row[f"next Constraint {label} (ms)"] *= 1e3
        took = []
        for token in document:
            mask, step = seconds(constraint.allowed)
            assert mask[token] and constraint.advance(token)
            took.append(step)
        row[f"allowed() {label} mean (ms)"] = statistics.mean(took) * 1e3
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--tokenizer", help="model directory (default: the embedded smollm2-135m-instruct)")
    parser.add_argument("--generations", type=int, default=4, help="decodes per grammar with the real model (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.tokenizer is None:
        from tunesmith.models import resolve

        args.tokenizer = resolve("smollm2-135m-instruct")
    # One intra-op thread: the masks are single-threaded anyway, and the model's two threads on two cores that
    # others share stall each other (measured here: 1.5 s a token instead of 54 ms).
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = AutoConfig.from_pretrained(args.tokenizer).vocab_size
    model = None
    if args.generations:
        model = AutoModelForCausalLM.from_pretrained(args.tokenizer, dtype=torch.float32).eval()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; tokenizer {len(tokenizer)} tokens, "
          f"logits {vocab_size}")

    rows = {}
    for name in args.libraries:
        if importlib.util.find_spec(BACKENDS[name].package.replace("-", "_")) is None:
            print(f"{name}: not installed, skipped")
            continue
        rows[name] = measure(BACKENDS[name](), tokenizer, vocab_size, model, args.generations, args.max_new_tokens)
    if "llguidance" in rows and importlib.util.find_spec("tunesmith"):
        rows["tunesmith"] = measure_tunesmith(tokenizer, vocab_size)
    keys = list(dict.fromkeys(key for row in rows.values() for key in row))
    print("\n| measure | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for key in keys:
        cells = [row.get(key, "-") for row in rows.values()]
        print(f"| {key} | " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
