"""Prompt templates (zero/k-shot, completion and chat layouts), shot selection, and chat rendering fallbacks."""

import dataclasses

import pytest

from tunesmith.data.templates import (
    CHAT_TEMPLATES,
    PromptTemplate,
    TemplateError,
    chat_template_for,
    render_chat,
    render_chat_spans,
    select_shots,
)

SENTIMENT = PromptTemplate(
    template="Review: {{ text }}\nSentiment:",
    answer=" {{ label }}",
    instruction="Classify the sentiment of each review.",
)
SHOTS = [{"text": "Loved it.", "label": "positive"}, {"text": "Dull and long.", "label": "negative"}]
QUERY = {"text": "Not bad at all.", "label": "positive"}


# ---------------------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------------------

def test_zero_shot_completion_prompt():
    assert SENTIMENT.prompt(QUERY) == (
        "Classify the sentiment of each review.\n\n"
        "Review: Not bad at all.\nSentiment:"
    )


def test_zero_shot_without_instruction_is_just_the_query():
    assert PromptTemplate("Q: {{ q }}\nA:").prompt({"q": "2+2?"}) == "Q: 2+2?\nA:"


def test_two_shot_completion_prompt():
    assert SENTIMENT.prompt(QUERY, SHOTS) == (
        "Classify the sentiment of each review.\n\n"
        "Review: Loved it.\nSentiment: positive\n\n"
        "Review: Dull and long.\nSentiment: negative\n\n"
        "Review: Not bad at all.\nSentiment:"
    )


def test_custom_separator_and_trailing_newline_kept():
    template = PromptTemplate("{{ a }} =\n", answer="{{ b }}", separator="---\n")
    assert template.prompt({"a": "x"}, [{"a": "1+1", "b": "2\n"}]) == "1+1 =\n2\n---\nx =\n"


def test_zero_shot_messages_use_instruction_as_system():
    assert SENTIMENT.messages(QUERY) == [
        {"role": "system", "content": "Classify the sentiment of each review."},
        {"role": "user", "content": "Review: Not bad at all.\nSentiment:"},
    ]


def test_two_shot_messages_alternate_user_and_stripped_assistant_turns():
    assert SENTIMENT.messages(QUERY, SHOTS, system="Answer with one word.") == [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Review: Loved it.\nSentiment:"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Review: Dull and long.\nSentiment:"},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "Review: Not bad at all.\nSentiment:"},
    ]


def test_empty_system_suppresses_the_instruction():
    assert SENTIMENT.messages(QUERY, system="") == [
        {"role": "user", "content": "Review: Not bad at all.\nSentiment:"},
    ]


def test_fields_covers_template_and_answer():
    assert SENTIMENT.fields() == {"text", "label"}
    looped = PromptTemplate("{% for o in options %}{{ o }} {% endfor %}{{ question }}")
    assert looped.fields() == {"options", "question"}  # the loop variable `o` is not a record field


def test_missing_field_error_names_the_field_and_the_record_keys():
    with pytest.raises(TemplateError) as err:
        SENTIMENT.render({"review": "Fine.", "label": "positive"})
    assert str(err.value) == (
        "The prompt template 'Review: {{ text }}\\nSentiment:' uses a field the record lacks "
        "('text' is undefined); the record's fields are: label, review."
    )


def test_missing_answer_field_names_the_answer_template():
    with pytest.raises(TemplateError, match=r"^The answer template ' \{\{ label \}\}' .*'label' is undefined"):
        SENTIMENT.prompt(QUERY, [{"text": "Loved it."}])


def test_syntax_error_reported_with_line_at_construction():
    with pytest.raises(TemplateError) as err:
        PromptTemplate("Question: {{ q }}\nAnswer: {{ a }")
    assert str(err.value) == (
        "The prompt template 'Question: {{ q }}\\nAnswer: {{ a }' has a Jinja syntax error on line 2: unexpected '}'."
    )


def test_syntax_error_in_answer_template():
    with pytest.raises(TemplateError, match=r"^The answer template '\{% if %\}' has a Jinja syntax error on line 1"):
        PromptTemplate("{{ q }}", answer="{% if %}")


def test_sandbox_blocks_unsafe_attribute_access():
    with pytest.raises(TemplateError, match="does something the sandbox forbids: access to attribute '__class__'"):
        PromptTemplate("{{ q.__class__.__mro__ }}").render({"q": "x"})


def test_shots_without_an_answer_template_are_refused():
    with pytest.raises(TemplateError, match="was given shots but has no answer template"):
        PromptTemplate("{{ text }}").prompt(QUERY, SHOTS)


def test_asdict_holds_only_the_user_facing_fields():
    assert dataclasses.asdict(SENTIMENT) == {
        "template": "Review: {{ text }}\nSentiment:",
        "answer": " {{ label }}",
        "instruction": "Classify the sentiment of each review.",
        "separator": "\n\n",
    }


# ---------------------------------------------------------------------------------------------------------
# Shot selection
# ---------------------------------------------------------------------------------------------------------

POOL = [{"i": i} for i in range(20)]


def test_select_first_k():
    assert select_shots(POOL, 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert select_shots(POOL, 0) == []


def test_seeded_random_is_exact_and_deterministic():
    # Pinned: the sampler uses only Random.random(), whose sequence Python keeps stable across versions.
    assert select_shots(POOL, 4, strategy="random", seed=0) == [{"i": 16}, {"i": 15}, {"i": 9}, {"i": 7}]
    assert select_shots(POOL, 4, strategy="random", seed=0) == select_shots(POOL, 4, strategy="random", seed=0)


def test_other_seed_gives_other_shots():
    assert select_shots(POOL, 4, strategy="random", seed=1) == [{"i": 2}, {"i": 17}, {"i": 15}, {"i": 7}]


def test_random_selection_does_not_mutate_the_pool():
    pool = list(POOL)
    select_shots(pool, 5, strategy="random", seed=3)
    assert pool == POOL


def test_exclude_skips_the_query():
    assert select_shots(POOL[:3], 2, exclude={"i": 0}) == [{"i": 1}, {"i": 2}]
    for seed in range(10):
        assert {"i": 5} not in select_shots(POOL[:6], 5, strategy="random", seed=seed, exclude={"i": 5})


def test_too_many_shots_says_how_many_there_are():
    with pytest.raises(ValueError, match=r"^Asked for 3 shots but the pool has only 2 exemplars\.$"):
        select_shots(POOL[:2], 3)
    with pytest.raises(ValueError, match=r"^Asked for 2 shots but the pool has only 1 exemplar after excluding "
                                         r"the query \(1 removed\)\.$"):
        select_shots(POOL[:2], 2, exclude={"i": 0})


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="Unknown shot selection strategy 'best'; use 'first' or 'random'."):
        select_shots(POOL, 1, strategy="best")


# ---------------------------------------------------------------------------------------------------------
# Chat templates (the lead's section), with a tiny in-memory tokenizer: no model download
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["some text"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_chat_template_for_picks_a_named_fallback(tiny_tokenizer):
    assert chat_template_for(tiny_tokenizer, "chatml") == CHAT_TEMPLATES["chatml"]
    assert chat_template_for(tiny_tokenizer, "{{ messages }}") == "{{ messages }}"  # a literal template


def test_chat_template_for_defaults_to_plain_without_markers(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    assert chat_template_for(tiny_tokenizer) == CHAT_TEMPLATES["plain"]


def test_render_chat_plain(tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]
    assert render_chat(tiny_tokenizer, msgs, chat_template="plain") == "User: hi\n\nAssistant: hello<|endoftext|>\n\n"


def test_render_chat_generation_prompt(tiny_tokenizer):
    text = render_chat(tiny_tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                       chat_template="plain")
    assert text == "User: hi\n\nAssistant:"
    assert text.endswith("Assistant:")


def test_prompt_messages_render_through_the_chat_template(tiny_tokenizer):
    msgs = SENTIMENT.messages(QUERY, SHOTS[:1])
    assert render_chat(tiny_tokenizer, msgs, add_generation_prompt=True, chat_template="plain") == (
        "Classify the sentiment of each review.\n\n"
        "User: Review: Loved it.\nSentiment:\n\n"
        "Assistant: positive<|endoftext|>\n\n"
        "User: Review: Not bad at all.\nSentiment:\n\n"
        "Assistant:"
    )


# ---------------------------------------------------------------------------------------------------------
# Where each message's content sits in the rendering
# ---------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe nice.<|im_end|>\n' }}{% endif %}"
                  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                  "{% endfor %}")


def test_render_chat_spans_are_positions_not_search_hits(tiny_tokenizer):
    # A search for "<|im_end|>" finds the injected system prompt's marker; the span is the user's own.
    text, spans = render_chat_spans(tiny_tokenizer, [{"role": "user", "content": "<|im_end|>"}],
                                    chat_template=DEFAULT_SYSTEM)
    assert text == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n<|im_end|><|im_end|>\n"
    start = len("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n")
    assert spans == [(0, start, start + len("<|im_end|>"))]
    assert text.find("<|im_end|>") < start


def test_render_chat_spans_follow_trimming_and_folding(tiny_tokenizer):
    # Gemma-like: system folded into the first user turn, user content trimmed, generation prompt appended.
    template = ("{{ '<bos>' }}{% for m in messages[1:] %}{{ '<start_of_turn>' + m['role'] + '\n' }}"
                "{% if loop.first %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
                "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  <end_of_turn>\n"}]
    text, spans = render_chat_spans(tiny_tokenizer, messages, add_generation_prompt=True, chat_template=template)
    assert text == "<bos><start_of_turn>user\nBe brief. \n\n<end_of_turn><end_of_turn>\n<start_of_turn>model\n"
    assert [(i, text[start:end]) for i, start, end in spans] == [(0, "Be brief. "), (1, "<end_of_turn>")]


def test_render_chat_spans_list_every_place_a_content_is_printed(tiny_tokenizer):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}(last: {{ messages[-1]['content'] }})"
    text, spans = render_chat_spans(tiny_tokenizer, [{"role": "user", "content": "a"},
                                                     {"role": "user", "content": "a"}], chat_template=template)
    assert text == "[a][a](last: a)"
    assert spans == [(0, 1, 2), (1, 4, 5), (1, 13, 14)]


def test_render_chat_spans_unaffected_by_content_that_spells_a_placeholder(tiny_tokenizer):
    messages = [{"role": "user", "content": "\ue0001\ue001"}, {"role": "user", "content": "b"}]
    text, spans = render_chat_spans(tiny_tokenizer, messages, chat_template=CHAT_TEMPLATES["chatml"])
    assert [(i, text[start:end]) for i, start, end in spans] == [(0, "\ue0001\ue001"), (1, "b")]


def test_render_chat_spans_none_when_the_template_rewrites_content(tiny_tokenizer):
    template = "{% for m in messages %}{{ m['content'] | replace('a', 'b') }};{% endfor %}"
    assert render_chat_spans(tiny_tokenizer, [{"role": "user", "content": "a"}], chat_template=template) == ("b;", None)
    # Content the rewrite leaves alone still aligns.
    assert render_chat_spans(tiny_tokenizer, [{"role": "user", "content": "c"}], chat_template=template) == (
        "c;", [(0, 0, 1)])
