"""Constrained decoding for response_format (generation/grammar.py) on the tiny byte-level BPE tokenizer and a
tiny random Llama: every decode ends in JSON that parses (and validates against the schema), EOS is masked
until the JSON is complete, lm_head padding is never allowed, grammars compile once, and a schema that cannot
be enforced gives a sentence that names response_format."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_llama
from tunesmith.generation import grammar
from tunesmith.generation.grammar import Constraint, ResponseFormatError, response_format_error, token_mask
from tunesmith.generation.params import ConstraintFailed

PADDING = 8  # lm_head rows past the tokenizer's vocabulary, as padded models have

SCHEMA = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "active": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["role", "age", "active", "address"],
    "additionalProperties": False,
}


def json_schema(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def decode(model, tokenizer, response_format, *, seed=None, max_new_tokens=600, more=False):
    """The engine's contract written out: mask the logits, pick (argmax, or sample when seeded), advance.
    A random model has no reason to ever end a string or an object, so a fixed bias toward '"', '}' and ']'
    gives it one; the mask alone decides what is legal. `more`: the grammar may go on after a complete
    sentence (parallel tool calls), so EOS is allowed before the end. Returns (text, finished)."""
    from transformers import DynamicCache

    vocab_size = model.config.vocab_size
    constraint = Constraint(tokenizer, response_format, vocab_size)
    bias = torch.zeros(vocab_size)
    bias[tokenizer.convert_tokens_to_ids(['"', "}", "]"])] = 1.5
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Reply in JSON."}],
                                                      add_generation_prompt=True, return_dict=True)["input_ids"]])
    cache, out = DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1] + bias
            mask = constraint.allowed()
            assert mask.shape == (vocab_size,) and mask.dtype == torch.bool
            assert not mask[len(tokenizer):].any(), "lm_head padding allowed"
            assert bool(mask[eos]) == constraint.is_done() or more, "EOS allowed before the JSON was complete"
            logits[~mask] = float("-inf")
            token = int(logits.argmax() if generator is None else torch.multinomial(logits.softmax(-1), 1,
                                                                                     generator=generator))
            assert constraint.advance(token)
            if token == eos:
                assert constraint.is_done() and constraint.allowed() is None
                return tokenizer.decode(out), True
            out.append(token)
            ids = torch.tensor([[token]])
    return tokenizer.decode(out), False


@pytest.fixture
def models(chatml_tokenizer):
    """Three random tiny Llamas whose lm_head is PADDING rows wider than the tokenizer."""
    tokenizer = chatml_tokenizer
    return tokenizer, [build_tiny_llama(tokenizer, seed=seed, vocab_size=len(tokenizer) + PADDING,
                                        max_position_embeddings=1024).eval() for seed in range(3)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_json_object_decodes_to_json_that_parses(models, sampled):
    tokenizer, lms = models
    for seed in range(6 if sampled else 3):  # greedy mostly closes at once ({}); sampling writes keys and values
        text, finished = decode(lms[seed % 3], tokenizer, {"type": "json_object"}, seed=seed if sampled else None)
        assert finished, text
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_json_schema_decodes_to_json_that_validates(models, sampled):
    tokenizer, lms = models
    for seed, model in enumerate(lms):
        text, finished = decode(model, tokenizer, json_schema(SCHEMA), seed=seed if sampled else None)
        assert finished, text
        value = json.loads(text)
        assert set(SCHEMA["required"]) <= set(value) <= set(SCHEMA["properties"]), text
        assert value["role"] in ("admin", "editor", "viewer")
        assert type(value["age"]) is int and 0 <= value["age"] <= 120
        assert type(value["active"]) is bool
        assert len(value.get("name", "")) <= 12
        assert len(value.get("tags", [])) <= 3 and set(value.get("tags", [])) <= {"a", "b"}
        assert list(value["address"]) == ["city"] and len(value["address"]["city"]) <= 8


def test_byte_level_tokens_spell_non_ascii_values(models):
    """"café" has no token of its own: the byte-level pieces of é must be allowed one after another."""
    tokenizer, lms = models
    words = ["café", "naïve", "日本"]
    for seed, model in enumerate(lms):
        schema = {"type": "object", "properties": {"word": {"enum": words}}, "required": ["word"]}
        text, finished = decode(model, tokenizer, json_schema(schema), seed=seed)
        assert finished and json.loads(text)["word"] in words, text


def test_eos_is_masked_until_the_json_is_complete(chatml_tokenizer):
    text = '{"a": [1, {"b": null}], "c": "x"}'
    ids = chatml_tokenizer.encode(text, add_special_tokens=False)
    constraint = Constraint(chatml_tokenizer, {"type": "json_object"}, len(chatml_tokenizer))
    eos = chatml_tokenizer.eos_token_id
    for token in ids:
        mask = constraint.allowed()
        assert mask[token] and not mask[eos]
        assert constraint.advance(token) and not constraint.error
    assert constraint.is_done()
    assert constraint.allowed().nonzero().flatten().tolist() == [eos]  # complete: only EOS may follow
    assert constraint.advance(eos) and constraint.allowed() is None


def test_a_token_outside_the_grammar_ends_the_row(chatml_tokenizer):
    constraint = Constraint(chatml_tokenizer, {"type": "json_object"}, len(chatml_tokenizer))
    assert not constraint.advance(chatml_tokenizer.convert_tokens_to_ids("a"))  # JSON cannot start with "a"
    assert constraint.is_done() and constraint.error
    with pytest.raises(ConstraintFailed, match="the grammar cannot go on"):  # the row ends: "grammar_error"
        constraint.allowed()


@pytest.mark.parametrize("extra", [-5, 0, PADDING])
def test_the_mask_is_as_wide_as_the_logits(chatml_tokenizer, extra):
    """lm_head may be wider than the tokenizer (padding, never allowed) or narrower (added tokens it lacks)."""
    vocab_size = len(chatml_tokenizer) + extra
    constraint = Constraint(chatml_tokenizer, {"type": "json_object"}, vocab_size)
    for token in chatml_tokenizer.encode('{"a": ', add_special_tokens=False):
        mask = constraint.allowed()
        assert mask.shape == (vocab_size,) and mask[token] and not mask[len(chatml_tokenizer):].any()
        assert constraint.advance(token)


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_plain_text_is_unconstrained(chatml_tokenizer, response_format):
    constraint = Constraint(chatml_tokenizer, response_format, len(chatml_tokenizer))
    assert constraint.allowed() is None and constraint.advance(5) and not constraint.is_done()
    assert token_mask(chatml_tokenizer, response_format, len(chatml_tokenizer)) is None
    assert response_format_error(response_format) is None


def test_token_mask_gives_each_row_its_own_state(chatml_tokenizer):
    factory = token_mask(chatml_tokenizer, {"type": "json_object"}, len(chatml_tokenizer))
    first, second = factory(), factory()
    first.advance(chatml_tokenizer.convert_tokens_to_ids("{"))
    assert not torch.equal(first.allowed(), second.allowed())


def test_tokenizer_info_and_grammars_are_compiled_once(chatml_tokenizer, monkeypatch):
    from tunesmith.generation import grammar_cache

    vocab_size = len(chatml_tokenizer) + PADDING
    first = token_mask(chatml_tokenizer, json_schema(SCHEMA), vocab_size).args[0]
    compiled = grammar._compiled(chatml_tokenizer, vocab_size, (chatml_tokenizer.eos_token_id,))
    again = token_mask(chatml_tokenizer, json_schema(SCHEMA), vocab_size).args[0]
    assert grammar._compiled(chatml_tokenizer, vocab_size, (chatml_tokenizer.eos_token_id,)) is compiled
    assert again.template is first.template  # the same compiled grammar, copied by each row

    # Kept within a budget in bytes (each matcher's size estimated from its grammar), least recent out first.
    cache = grammar_cache.ByteLRU(3 * grammar_cache.MIN_TEMPLATE_BYTES)
    monkeypatch.setattr(grammar, "TEMPLATES", cache)
    schemas = [json_schema({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}) for i in range(5)]
    kept = [token_mask(chatml_tokenizer, schema, vocab_size).args[0] for schema in schemas]
    assert {grammar_cache.template_bytes(k.grammar) for k in kept} == {grammar_cache.MIN_TEMPLATE_BYTES}
    assert len(cache) == 3 and cache.used <= cache.budget
    assert cache.get((compiled, kept[0].grammar)) is None and cache.get((compiled, kept[-1].grammar)) is not None
    huge = grammar_cache.ByteLRU(100)
    huge.put("big", object(), 101)
    assert len(huge) == 0  # larger than the whole budget: not kept


def test_a_row_copies_the_grammar_its_request_compiled_even_when_the_cache_dropped_it(chatml_tokenizer,
                                                                                       monkeypatch):
    """A request's factory holds its compiled grammar: a row never compiles (on the engine's thread)."""
    factory = token_mask(chatml_tokenizer, json_schema(SCHEMA), len(chatml_tokenizer))
    monkeypatch.setattr(grammar._Compiled, "template", lambda *a: pytest.fail("compiled again"))
    assert factory().allowed() is not None


@pytest.mark.parametrize("response_format, expected", [
    ("json", "response_format must be an object"),
    ({"type": "xml"}, "response_format.type 'xml' is not supported"),
    ({"type": "json_schema"}, "response_format.json_schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "format": 1}}, "unknown field(s) format"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}, "strict must be"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": True}}, "schema must be a JSON Schema object"),
    (json_schema({"type": "strng"}), "response_format.json_schema.schema cannot be enforced: Invalid type: strng"),
    (json_schema({"type": "object", "required": "name"}), "Expected array for 'required'"),
    (json_schema({"type": "string", "pattern": "(["}), "regex parse error"),
    (json_schema({"$ref": "#/$defs/missing"}), "does not exist"),
    (json_schema({"enum": []}), "Unsatisfiable schema"),
    (json_schema({"type": "array", "uniqueItems": True}),
     "Unimplemented keys: [\"uniqueItems\"]. Remove them, or set response_format.json_schema.strict to false"),
])
def test_a_schema_that_cannot_be_enforced_gives_the_400_message(chatml_tokenizer, response_format, expected):
    message = response_format_error(response_format)
    assert message is not None and message.startswith("response_format") and expected in message, message
    with pytest.raises(ResponseFormatError, match="^response_format") as raised:
        Constraint(chatml_tokenizer, response_format, len(chatml_tokenizer))
    assert str(raised.value) == message


def test_non_strict_schemas_enforce_what_they_can(chatml_tokenizer):
    """OpenAI's strict=false: keywords llguidance cannot enforce are ignored, the rest still holds."""
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    assert response_format_error(json_schema(schema, strict=False)) is None
    constraint = Constraint(chatml_tokenizer, json_schema(schema, strict=False), len(chatml_tokenizer))
    assert constraint.advance(chatml_tokenizer.convert_tokens_to_ids("["))
    assert not constraint.advance(chatml_tokenizer.convert_tokens_to_ids('"'))  # items are integers


# -- tool calls: tool_call_grammar ------------------------------------------------------------------------------

FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
                  "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                  "required": ["city"], "additionalProperties": False}},
             {"name": "now"}]  # no parameters: the arguments are {}


@pytest.mark.parametrize("style", ["hermes", "json"])
def test_tool_call_grammar_decodes_to_calls_that_parse_and_validate(models, style):
    import jsonschema

    from tunesmith.data.tools import parse_reply
    from tunesmith.generation.grammar import parameters_schema, tool_call_grammar

    tokenizer, lms = models
    for seed in range(6):
        named = seed % 3 == 2  # every third decode names get_weather
        grammar_ = tool_call_grammar(FUNCTIONS[:1] if named else FUNCTIONS, style, parallel=style == "hermes")
        text, finished = decode(lms[seed % 3], tokenizer, grammar_, seed=seed, more=style == "hermes")
        content, calls = parse_reply(text, style)
        assert finished and content is None and calls, text
        for call in calls:
            function = next(f for f in FUNCTIONS if f["name"] == call["function"]["name"])
            assert not named or function is FUNCTIONS[0]
            jsonschema.validate(json.loads(call["function"]["arguments"]), parameters_schema(function.get("parameters")))


@pytest.mark.parametrize("parallel", [False, True])
def test_a_complete_call_ends_the_reply_or_starts_another(chatml_tokenizer, parallel):
    from tunesmith.data.tools import format_call
    from tunesmith.generation.grammar import tool_call_grammar

    constraint = Constraint(chatml_tokenizer, tool_call_grammar(FUNCTIONS, "hermes", parallel=parallel),
                            len(chatml_tokenizer))
    for token in chatml_tokenizer.encode(format_call("get_weather", {"city": "Paris"}), add_special_tokens=False):
        assert constraint.allowed()[token] and constraint.advance(token)
    after = {chatml_tokenizer.decode([t]) for t in constraint.allowed().nonzero().flatten().tolist()}
    assert after == ({"<|im_end|>", "\n"} if parallel else {"<|im_end|>"})


def test_a_call_of_a_function_not_offered_is_outside_the_grammar(chatml_tokenizer):
    from tunesmith.generation.grammar import tool_call_grammar

    constraint = Constraint(chatml_tokenizer, tool_call_grammar(FUNCTIONS[1:], "json"), len(chatml_tokenizer))
    ids = chatml_tokenizer.encode('{"name": "get_weather"', add_special_tokens=False)
    assert not all(constraint.advance(t) for t in ids) and constraint.error


def test_calls_are_held_to_the_spacing_they_are_trained_on(chatml_tokenizer):
    """json.dumps' separators, as data/tools.format_call writes calls: no compact JSON, no padding."""
    from tunesmith.generation.grammar import tool_call_grammar

    for text, fits in [('{"name": "now", "parameters": {}}', True), ('{"name":"now"', False),
                       ('{"name":  "now"', False), ('{\n"name": "now"', False)]:
        constraint = Constraint(chatml_tokenizer, tool_call_grammar(FUNCTIONS, "json"), len(chatml_tokenizer))
        assert all(constraint.advance(t) for t in chatml_tokenizer.encode(text, add_special_tokens=False)) == fits
