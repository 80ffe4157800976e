"""Preference data: TRL's pairs (explicit and implicit prompt, text and conversational), OpenAI's preference format
and TRL's unpaired (KTO) records read into the two internal shapes; every problem at file:line: field; conversions
between them; masks that put the learnable tokens on each reply alone; `data preview` shows both replies."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.formats import (DataError, convert_file, detect_format, kind_of, read_records, to_chat,
                                    validate)
from tunesmith.data.preference import as_sft
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_record

USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"role": "assistant", "content": "The capital of France is Paris."}
BAD = {"role": "assistant", "content": "Paris is in France."}
TEXT_PAIR = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
CHAT_PAIR = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------------------
# reading every format into the internal shapes
# ---------------------------------------------------------------------------------------------------------

def test_trl_pairs_text_and_conversational_are_read_as_they_are(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [TEXT_PAIR, CHAT_PAIR])
    assert detect_format(path) == "preference"
    assert read_records(path) == [TEXT_PAIR, CHAT_PAIR]
    assert [kind_of(r) for r in read_records(path)] == ["preference", "preference"]


def test_an_implicit_prompt_is_what_both_replies_begin_with(tmp_path):
    """TRL's extract_prompt: the common message prefix of two conversations, or the common text (a space before
    the replies stays with them)."""
    path = write(tmp_path / "hh.jsonl", [{"chosen": [USER, GOOD], "rejected": [USER, BAD]},
                                         {"chosen": "Human: sky? Assistant: blue", "rejected": "Human: sky? Assistant: red"},
                                         {"prompt": "ignored beside conversations", "chosen": [USER, GOOD],
                                          "rejected": [USER, BAD]}])
    assert read_records(path) == [CHAT_PAIR, {"prompt": "Human: sky? Assistant:", "chosen": " blue",
                                              "rejected": " red"}, CHAT_PAIR]


def test_openai_preference_format_becomes_a_conversational_pair(tmp_path):
    record = {"input": {"messages": [USER], "tools": [LOOKUP], "parallel_tool_calls": False},
              "preferred_output": [GOOD], "non_preferred_output": [BAD]}
    path = write(tmp_path / "openai.jsonl", [record])
    assert detect_format(path) == "openai-preference"
    assert read_records(path) == [{**CHAT_PAIR, "tools": [LOOKUP]}]


def test_unpaired_records_text_and_conversational(tmp_path):
    path = write(tmp_path / "kto.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4", "label": True},
                                          {"prompt": [USER], "completion": [BAD], "label": False}])
    assert detect_format(path) == "kto"
    assert read_records(path) == [{"prompt": "Q: 2+2?\nA:", "completion": " 4", "label": True},
                                  {"prompt": [USER], "completion": [BAD], "label": False}]
    assert validate(path).kind == "unpaired"


def test_a_reply_may_call_tools_and_get_results_before_it_answers(tmp_path):
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "Paris"}
    path = write(tmp_path / "tools.jsonl", [{"prompt": [USER], "chosen": [call, result, GOOD], "rejected": [BAD],
                                             "tools": [LOOKUP]}])
    [record] = read_records(path)
    assert [m["role"] for m in record["chosen"]] == ["assistant", "tool", "assistant"]
    assert record["tools"] == [LOOKUP]


# ---------------------------------------------------------------------------------------------------------
# problems, at file:line: field
# ---------------------------------------------------------------------------------------------------------

def problems(tmp_path, name: str, records: list) -> list[str]:
    report = validate(write(tmp_path / name, records))
    return [str(p).replace(f"{tmp_path}/", "") for p in report.problems]


def test_pair_problems_name_their_line_and_field(tmp_path):
    assert problems(tmp_path, "p.jsonl", [
        TEXT_PAIR,
        {"prompt": [USER], "chosen": "x", "rejected": "y"},
        {"prompt": [USER], "chosen": [{"role": "user", "content": "Hello"}], "rejected": [BAD]},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "a", "chosen": "b"},
        {"prompt": [USER], "chosen": [GOOD], "rejected": "text"},
        {"chosen": [USER, GOOD], "rejected": [USER, GOOD, BAD]},
        {"prompt": [USER], "chosen": [{**GOOD, "weight": 0}], "rejected": [BAD]},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": [BAD]},
    ]) == [
        "p.jsonl:2: prompt: prompt is a list of messages but chosen is text: a record is conversational (every "
        "field a list of messages) or plain text (every field a string), not both",
        "p.jsonl:3: chosen[0].role: a reply holds the assistant's turns (and the results of its tool calls), not "
        "a user message; put the conversation before the reply in prompt",
        "p.jsonl:4: rejected: the same reply as chosen: a pair needs two different replies",
        "p.jsonl:5: rejected: missing rejected",
        "p.jsonl:6: rejected: chosen is a list of messages but rejected is text: a record is conversational "
        "(every field a list of messages) or plain text (every field a string), not both",
        "p.jsonl:7: chosen: nothing in chosen after the prompt that both replies begin with: the replies are the "
        "messages after it",
        "p.jsonl:8: chosen: no assistant turn to learn from (every one has weight 0)",
        "p.jsonl:9: chosen[0].content: empty message",
    ]


def test_an_implicit_prompt_names_reply_messages_by_their_place_in_the_whole_conversation(tmp_path):
    assert problems(tmp_path, "hh.jsonl", [
        {"chosen": [USER, GOOD, USER], "rejected": [USER, BAD]},
    ]) == ["hh.jsonl:1: chosen[2].role: a reply holds the assistant's turns (and the results of its tool calls), "
           "not a user message; put the conversation before the reply in prompt"]


def test_openai_preference_problems(tmp_path):
    assert problems(tmp_path, "o.jsonl", [
        {"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},
        {"input": {"messages": []}, "preferred_output": [GOOD], "non_preferred_output": "x"},
        {"input": "hi", "preferred_output": [GOOD], "non_preferred_output": [BAD]},
        {"input": {"messages": [USER], "tools": [{"type": "function", "function": {}}]},
         "preferred_output": [{"role": "bot", "content": "x"}], "non_preferred_output": [BAD]},
    ]) == [
        "o.jsonl:2: input.messages: messages is empty",
        "o.jsonl:2: non_preferred_output: non_preferred_output must be a list, got string",
        "o.jsonl:3: input: input must be an object with messages (and tools), got string",
        "o.jsonl:4: input.tools[0].function.name: missing name",
        "o.jsonl:4: preferred_output[0].role: unknown role 'bot' (expected system, user, assistant or tool)",
    ]


def test_unpaired_problems(tmp_path):
    assert problems(tmp_path, "k.jsonl", [
        {"prompt": "hi", "completion": "hello", "label": "yes"},
        {"prompt": "hi", "completion": [GOOD], "label": True},
        {"prompt": "hi", "completion": "", "label": False},
    ]) == [
        "k.jsonl:1: label: label must be true or false (a good or a bad reply), got 'yes'",
        "k.jsonl:2: prompt: prompt is text but completion is a list of messages: a record is conversational "
        "(every field a list of messages) or plain text (every field a string), not both",
        "k.jsonl:3: completion: empty completion",
    ]


# ---------------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------------

def test_convert_openai_to_trl_pairs_and_back(tmp_path):
    openai = {"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}
    src = write(tmp_path / "openai.jsonl", [openai])
    assert convert_file(src, tmp_path / "trl.jsonl", to="preference") == 1
    assert read_records(tmp_path / "trl.jsonl") == [CHAT_PAIR]
    assert convert_file(tmp_path / "trl.jsonl", tmp_path / "back.jsonl", to="openai-preference") == 1
    assert json.loads((tmp_path / "back.jsonl").read_text()) == openai


def test_text_pairs_become_messages_in_openai_format(tmp_path):
    src = write(tmp_path / "pairs.jsonl", [TEXT_PAIR])
    convert_file(src, tmp_path / "o.jsonl", to="openai-preference")
    assert json.loads((tmp_path / "o.jsonl").read_text()) == {
        "input": {"messages": [{"role": "user", "content": "Q: 2+2?\nA:"}]},
        "preferred_output": [{"role": "assistant", "content": " 4"}],
        "non_preferred_output": [{"role": "assistant", "content": " 5"}]}


def test_pairs_to_kto_give_a_good_and_a_bad_record_each(tmp_path):
    src = write(tmp_path / "pairs.jsonl", [TEXT_PAIR, {**CHAT_PAIR, "tools": [LOOKUP]}])
    assert convert_file(src, tmp_path / "kto.jsonl", to="kto") == 4
    assert read_records(tmp_path / "kto.jsonl") == [
        {"prompt": "Q: 2+2?\nA:", "completion": " 4", "label": True},
        {"prompt": "Q: 2+2?\nA:", "completion": " 5", "label": False},
        {"prompt": [USER], "completion": [GOOD], "label": True, "tools": [LOOKUP]},
        {"prompt": [USER], "completion": [BAD], "label": False, "tools": [LOOKUP]}]


def test_pairs_to_chat_keep_the_chosen_reply_and_chat_cannot_become_pairs(tmp_path):
    assert to_chat(CHAT_PAIR) == {"messages": [USER, GOOD]}
    assert to_chat(TEXT_PAIR) == {"messages": [{"role": "user", "content": "Q: 2+2?\nA:"},
                                               {"role": "assistant", "content": " 4"}]}
    chat = write(tmp_path / "chat.jsonl", [{"messages": [USER, GOOD]}])
    with pytest.raises(DataError, match="chat records cannot be converted to kto: only preference or unpaired "
                                        "records can"):
        convert_file(chat, tmp_path / "out.jsonl", to="kto")
    kto = write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(DataError, match="unpaired records cannot be converted to preference"):
        convert_file(kto, tmp_path / "out.jsonl", to="preference")


def test_cli_convert_and_validate(tmp_path, capsys):
    src = write(tmp_path / "pairs.jsonl", [TEXT_PAIR, CHAT_PAIR])
    assert main(["data", "validate", str(src)]) == 0
    assert f"{src}: ok, 2 preference records (preference)" in capsys.readouterr().out
    assert main(["data", "convert", str(src), "--to", "kto", "-o", str(tmp_path / "k.jsonl")]) == 0
    assert "wrote 4 kto records" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# masks: the reply's tokens alone are learnable
# ---------------------------------------------------------------------------------------------------------

def learnable_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_each_reply_is_learnable_and_the_prompt_is_not(chatml_tokenizer):
    earlier = {"role": "assistant", "content": "Hello! How can I help you today?"}
    pair = {"prompt": [{"role": "user", "content": "hi"}, earlier, USER], "chosen": [GOOD], "rejected": [BAD]}
    chosen = tokenize_record(chatml_tokenizer, as_sft(pair, "chosen"))
    rejected = tokenize_record(chatml_tokenizer, as_sft(pair, "rejected"))
    assert learnable_text(chatml_tokenizer, chosen) == "The capital of France is Paris.<|im_end|>"
    assert learnable_text(chatml_tokenizer, rejected) == "Paris is in France.<|im_end|>"
    # By token position: the two sequences share every token up to the reply, and none of those is learnable.
    shared = next(i for i, (a, b) in enumerate(zip(chosen.input_ids, rejected.input_ids)) if a != b)
    assert chosen.input_ids[:shared] == rejected.input_ids[:shared]
    first = chosen.labels.index(next(label for label in chosen.labels if label != IGNORE_INDEX))
    assert first == shared and set(chosen.labels[:shared]) == {IGNORE_INDEX}
    assert all(label == token for label, token in zip(chosen.labels[shared:], chosen.input_ids[shared:])
               if label != IGNORE_INDEX)


def test_a_text_pair_masks_like_a_completion(chatml_tokenizer):
    example = tokenize_record(chatml_tokenizer, as_sft(TEXT_PAIR, "rejected"))
    assert learnable_text(chatml_tokenizer, example) == " 5<|im_end|>"


def test_preview_shows_both_replies_with_their_learnable_tokens(tmp_path, model_dir, capsys):
    src = write(tmp_path / "pairs.jsonl", [CHAT_PAIR])
    assert main(["data", "preview", str(src), "--model", str(model_dir), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "── pair 1, chosen:" in out and "── pair 1, rejected:" in out
    assert "assistant\n⟦The capital of France is Paris.<|im_end|>⟧\n" in out
    assert "assistant\n⟦Paris is in France.<|im_end|>⟧\n" in out
    assert out.count("⟦") == 2 and "2 examples (1 pairs)" in out


def test_preview_of_unpaired_says_whether_the_reply_is_good(tmp_path, model_dir, capsys):
    src = write(tmp_path / "kto.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 5", "label": False}])
    assert main(["data", "preview", str(src), "--model", str(model_dir), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "── example 1, a bad reply:" in out and "Q: 2+2?\nA:⟦ 5⟧⟦<eos>⟧" in out
