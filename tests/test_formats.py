"""Data formats: exact records from every reader, detection, every problem with its file:line: field,
all problems in one pass, conversion round-trips, atomic writing, and all-or-nothing conversion."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.formats import (FORMATS, KINDS, DataError, Problem, convert_file, detect_format,
                                    iter_records, kind_of, read_records, to_chat, to_completion, validate,
                                    write_jsonl)

USER, ASSISTANT = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
CHAT = {"messages": [USER, ASSISTANT]}


def write(tmp_path, name: str, content) -> str:
    """A file in tmp_path; `content` is text, bytes, or a list of records (written one JSON per line)."""
    path = tmp_path / name
    if isinstance(content, list):
        content = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return name


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Relative names, so problems name the file as a user typed it: "data.jsonl:3: ..."."""
    monkeypatch.chdir(tmp_path)


def problems_of(path, **kw) -> list[str]:
    problems: list[Problem] = []
    list(iter_records(path, problems=problems, **kw))
    return [str(p) for p in problems]


# ---------------------------------------------------------------------------------------------------------
# readers: exact records
# ---------------------------------------------------------------------------------------------------------

def test_openai_chat_keeps_role_content_weight_and_ignores_extra_keys(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?", "name": "ann"},
                           {"role": "assistant", "content": "Hey.", "weight": 0, "tool_calls": []}, USER, ASSISTANT],
              "tools": [], "metadata": {"source": "crm"}}
    assert read_records(write(tmp_path, "data.jsonl", [record])) == [{"messages": [
        {"role": "system", "content": "Be brief."}, USER | {"content": "Hi?"},
        {"role": "assistant", "content": "Hey.", "weight": 0}, USER, ASSISTANT]}]


def test_completion(tmp_path):
    rows = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "", "completion": "free text", "extra": 1}]
    assert read_records(write(tmp_path, "data.jsonl", rows)) == [
        {"prompt": "2+2=", "completion": " 4"}, {"prompt": "", "completion": "free text"}]


def test_alpaca_maps_system_history_instruction_and_input(tmp_path):
    rows = [{"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You translate.",
             "history": [["Hi", "Hello"]]},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"}]
    assert read_records(write(tmp_path, "data.json", json.dumps(rows, indent=2))) == [
        {"messages": [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Translate.\n\nchat"},
                      {"role": "assistant", "content": "cat"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "bye"}]},
    ]


def test_alpaca_as_jsonl(tmp_path):
    assert read_records(write(tmp_path, "data.jsonl", [{"instruction": "Q", "output": "A"}])) == [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]


def test_sharegpt_maps_speakers_and_top_level_system(tmp_path):
    row = {"system": "Sys.", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
        {"from": "chatgpt", "value": "d"}, {"from": "Human", "value": "e"}, {"from": "model", "value": "f"}]}
    assert read_records(write(tmp_path, "data.jsonl", [row])) == [{"messages": [
        {"role": "system", "content": "Sys."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"}]}]


def test_text_file_paragraphs_are_completions(tmp_path):
    path = write(tmp_path, "corpus.txt", "First para\nstill first.\n\n\n  \nSecond.\r\n\r\nThird")
    assert read_records(path) == [{"prompt": "", "completion": "First para\nstill first."},
                                  {"prompt": "", "completion": "Second."}, {"prompt": "", "completion": "Third"}]


def test_text_jsonl(tmp_path):
    assert read_records(write(tmp_path, "data.jsonl", [{"text": "Once upon"}])) == [
        {"prompt": "", "completion": "Once upon"}]


def test_csv_with_quoted_multiline_field_and_extra_columns(tmp_path):
    path = write(tmp_path, "data.csv", 'id,text,label\n1,"great,\nreally",pos\n\n2,bad,neg\n')
    assert read_records(path) == [{"text": "great,\nreally", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_tsv_and_custom_columns(tmp_path):
    path = write(tmp_path, "data.tsv", "review\tstars\nok, fine\t3\n")
    assert read_records(path, text_column="review", label_column="stars") == [{"text": "ok, fine", "label": "3"}]
    path = write(tmp_path, "semi.csv", "text;label\na;b\n")
    assert read_records(path, delimiter=";") == [{"text": "a", "label": "b"}]


def test_conll_four_columns_docstart_and_sentences(tmp_path):
    path = write(tmp_path, "train.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP S-ORG\nrejects VBZ B-VP O\n"
                                          "German JJ B-NP B-MISC\n\n\nPeter\tI-PER\nBlackburn\tL-PER\n")
    assert read_records(path) == [{"tokens": ["EU", "rejects", "German"], "tags": ["S-ORG", "O", "B-MISC"]},
                                  {"tokens": ["Peter", "Blackburn"], "tags": ["I-PER", "L-PER"]}]


def test_classification_and_tagging_jsonl(tmp_path):
    assert read_records(write(tmp_path, "cls.jsonl", [{"text": "t", "label": 3}, {"text": "u", "label": "neg"}])) == [
        {"text": "t", "label": "3"}, {"text": "u", "label": "neg"}]
    assert read_records(write(tmp_path, "tag.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["B-X", "O"]}])) == [
        {"tokens": ["a", "b"], "tags": ["B-X", "O"]}]


def test_registry_names_and_kinds():
    assert set(FORMATS) == {"openai-chat", "completion", "alpaca", "sharegpt", "text", "csv", "conll",
                            "classification-jsonl", "tagging-jsonl", "preference", "openai-preference", "kto"}
    assert {name: r.kind for name, r in FORMATS.items() if r.kind != "chat"} == {
        "completion": "completion", "text": "completion", "csv": "classification", "conll": "tagging",
        "classification-jsonl": "classification", "tagging-jsonl": "tagging", "preference": "preference",
        "openai-preference": "preference", "kto": "unpaired"}


def test_kind_of():
    assert KINDS == ("chat", "preference", "unpaired", "completion", "classification", "tagging")
    assert [kind_of(r) for r in (CHAT, {"prompt": "", "chosen": "x", "rejected": "y"},
                                 {"prompt": "", "completion": "x", "label": True}, {"prompt": "", "completion": "x"},
                                 {"text": "t", "label": "l"}, {"tokens": [], "tags": []})] == list(KINDS)
    with pytest.raises(DataError, match="keys instruction, output"):
        kind_of({"instruction": "x", "output": "y"})


# ---------------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, first, expected", [
    ("a.jsonl", CHAT, "openai-chat"),
    ("a.jsonl", {"prompt": "p", "completion": "c"}, "completion"),
    ("a.jsonl", {"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ("a.jsonl", {"conversations": []}, "sharegpt"),
    ("a.jsonl", {"text": "t", "label": "l"}, "classification-jsonl"),
    ("a.jsonl", {"tokens": [], "tags": []}, "tagging-jsonl"),
    ("a.jsonl", {"tokens": [], "ner_tags": []}, "tagging-jsonl"),
    ("a.jsonl", {"text": "t", "meta": 1}, "text"),
    ("a.json", CHAT, "openai-chat"),
])
def test_detect_json_by_first_record_keys(tmp_path, name, first, expected):
    assert detect_format(write(tmp_path, name, [first])) == expected


def test_detect_json_array_and_skips_broken_first_line(tmp_path):
    assert detect_format(write(tmp_path, "a.json", ' \n[\n  {"instruction": "i", "output": "o"}]')) == "alpaca"
    assert detect_format(write(tmp_path, "b.jsonl", ["{broken", {"prompt": "p", "completion": "c"}])) == "completion"


@pytest.mark.parametrize("name, expected", [("x.conll", "conll"), ("x.IOB", "conll"), ("x.bio", "conll"),
                                            ("x.bioes", "conll"), ("x.csv", "csv"), ("x.tsv", "csv"),
                                            ("x.txt", "text")])
def test_detect_by_extension(tmp_path, name, expected):
    assert detect_format(write(tmp_path, name, "")) == expected


def test_detect_unknown_shape_names_keys_and_expected_shapes(tmp_path):
    with pytest.raises(DataError) as err:
        detect_format(write(tmp_path, "data.jsonl", [{"question": "q", "answer": "a"}]))
    message = str(err.value)
    assert "data.jsonl:1: unrecognised record with keys question, answer" in message
    assert "messages (openai-chat)" in message and "instruction+output (alpaca)" in message


def test_detect_unknown_extension_and_empty_json(tmp_path):
    with pytest.raises(DataError, match=r"data.parquet: cannot tell the format from the extension '.parquet'"):
        detect_format(write(tmp_path, "data.parquet", "x"))
    with pytest.raises(DataError, match="data.jsonl: empty file: no records"):
        detect_format(write(tmp_path, "data.jsonl", "\n \n"))


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path, "notes.md", "para one\n\npara two\n")
    assert len(read_records(path, format="text")) == 2
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        read_records(path, format="yaml")


# ---------------------------------------------------------------------------------------------------------
# problems: each one with its exact file:line: field
# ---------------------------------------------------------------------------------------------------------

def msg(*messages, **extra):
    return {"messages": list(messages), **extra}


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "data.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ([1, 2], "data.jsonl:2: record must be a JSON object, got list"),
    ({"msgs": []}, "data.jsonl:2: messages: missing messages"),
    ({"messages": "hi"}, "data.jsonl:2: messages: messages must be a list, got string"),
    ({"messages": []}, "data.jsonl:2: messages: messages is empty"),
    (msg("hi", ASSISTANT), "data.jsonl:2: messages[0]: message must be an object, got string"),
    (msg({"role": "bot", "content": "x"}, ASSISTANT),
     "data.jsonl:2: messages[0].role: unknown role 'bot' (expected system, user, assistant or tool)"),
    (msg({"content": "x"}, ASSISTANT), "data.jsonl:2: messages[0].role: missing role"),
    (msg(USER, {"role": "assistant"}), "data.jsonl:2: messages[1].content: missing content"),
    (msg(USER, {"role": "assistant", "content": ["x"]}),
     "data.jsonl:2: messages[1].content: content must be a string, got list"),
    (msg(USER, {"role": "assistant", "content": " \n"}), "data.jsonl:2: messages[1].content: empty message"),
    (msg(USER, ASSISTANT | {"weight": 2}), "data.jsonl:2: messages[1].weight: weight must be 0 or 1, got 2"),
    (msg(USER, ASSISTANT | {"weight": True}), "data.jsonl:2: messages[1].weight: weight must be 0 or 1, got true"),
    (msg(USER | {"weight": 1}, ASSISTANT),
     "data.jsonl:2: messages[0].weight: weight is only allowed on assistant messages, not 'user'"),
    (msg(USER), "data.jsonl:2: messages: no assistant turn to learn from"),
    (msg(USER, ASSISTANT | {"weight": 0}), "data.jsonl:2: messages: no assistant turn to learn from"),
])
def test_openai_chat_problems(tmp_path, bad, expected):
    path = write(tmp_path, "data.jsonl", [CHAT, bad if isinstance(bad, str) else json.dumps(bad), CHAT])
    assert problems_of(path) == [expected]
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).splitlines() == ["1 problem in data.jsonl:", expected]


@pytest.mark.parametrize("fmt, bad, expected", [
    ("completion", {"prompt": "p", "completion": ""}, "data.jsonl:2: completion: empty completion"),
    ("completion", {"prompt": 1, "completion": "c"}, "data.jsonl:2: prompt: prompt must be a string, got number"),
    ("completion", {"completion": "c"}, "data.jsonl:2: prompt: missing prompt"),
    ("alpaca", {"instruction": "i", "output": " "}, "data.jsonl:2: output: empty output"),
    ("alpaca", {"instruction": "i", "output": ["o"]}, "data.jsonl:2: output: output must be a string, got list"),
    ("alpaca", {"instruction": "i", "input": 3, "output": "o"}, "data.jsonl:2: input: input must be a string, got number"),
    ("alpaca", {"instruction": "i", "output": "o", "history": [["only one"]]},
     "data.jsonl:2: history[0]: history turn must be a [user, assistant] pair of strings"),
    ("alpaca", {"instruction": "i", "output": "o", "history": [["Hi", " "]]}, "data.jsonl:2: history[0][1]: empty message"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "data.jsonl:2: conversations[1].from: unknown speaker 'bot' (expected one of human, user, gpt, assistant, "
     "chatgpt, model, bing, bard, system, function_call, observation)"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     "data.jsonl:2: conversations[1].value: empty message"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}]},
     "data.jsonl:2: conversations: no assistant turn to learn from"),
    ("classification-jsonl", {"text": "", "label": "x"}, "data.jsonl:2: text: empty text"),
    ("classification-jsonl", {"text": "t", "label": 1.5}, "data.jsonl:2: label: label must be a string or an integer, got number"),
    ("classification-jsonl", {"text": "t"}, "data.jsonl:2: label: missing label"),
    ("tagging-jsonl", {"tokens": ["a"], "tags": ["O", "O"]}, "data.jsonl:2: tags: 2 tags for 1 tokens (they must pair up one to one)"),
    ("tagging-jsonl", {"tokens": ["a"], "ner_tags": [3]},
     "data.jsonl:2: ner_tags[0]: ner_tags must be strings, got number (integer class ids need their tag names, e.g. 'B-PER')"),
    ("tagging-jsonl", {"tokens": [], "tags": ["O"]}, "data.jsonl:2: tokens: tokens is empty"),
    ("text", {"text": 5}, "data.jsonl:2: text: text must be a string, got number"),
])
def test_json_format_problems(tmp_path, fmt, bad, expected):
    good = {"completion": {"prompt": "p", "completion": "c"}, "alpaca": {"instruction": "i", "output": "o"},
            "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            "classification-jsonl": {"text": "t", "label": "l"}, "tagging-jsonl": {"tokens": ["a"], "tags": ["O"]},
            "text": {"text": "t"}}[fmt]
    path = write(tmp_path, "data.jsonl", [good, bad])
    assert detect_format(path) == fmt
    assert problems_of(path) == [expected]


def test_all_problems_in_one_pass(tmp_path):
    path = write(tmp_path, "data.jsonl", [CHAT, "{oops", CHAT, msg(USER), json.dumps([]), CHAT])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert [p.line for p in err.value.problems] == [2, 4, 5]
    assert str(err.value).splitlines()[0] == "3 problems in data.jsonl:"


def test_invalid_utf8_is_reported_on_its_line_and_later_lines_still_checked(tmp_path):
    lines = [json.dumps(CHAT).encode()] * 2 + [b'{"messages": "caf\xe9"}', json.dumps(msg(USER)).encode(),
                                                json.dumps(CHAT).encode()]
    path = write(tmp_path, "data.jsonl", b"\n".join(lines) + b"\n")
    problems: list[Problem] = []
    assert len(list(iter_records(path, problems=problems))) == 3
    assert [str(p) for p in problems] == ["data.jsonl:3: invalid UTF-8 (byte 0xe9 at column 18)",
                                          "data.jsonl:4: messages: no assistant turn to learn from"]


def test_json_array_problems_name_the_record(tmp_path):
    rows = [{"instruction": "i", "output": "o"}] * 3 + [{"instruction": "i", "output": ""}, "x"]
    path = write(tmp_path, "data.json", json.dumps(rows, indent=2))
    assert problems_of(path) == ["data.json:record 4: output: empty output",
                                 "data.json:record 5: record must be a JSON object, got string"]


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "data.json", '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": }\n]')
    assert problems_of(path, format="alpaca") == ["data.json:3: invalid JSON: Expecting value (column 19)"]


def test_empty_files(tmp_path):
    for name in ("a.txt", "a.csv", "a.conll"):
        assert problems_of(write(tmp_path, name, "\n\n")) == [f"{name}: empty file: no records"]
    assert problems_of(write(tmp_path, "h.csv", "text,label\n")) == ["h.csv: empty file: no records"]
    assert problems_of(write(tmp_path, "e.json", "[]"), format="alpaca") == ["e.json: empty file: no records"]
    report = validate(write(tmp_path, "e.jsonl", ""))
    assert (report.ok, report.format, [str(p) for p in report.problems]) == (
        False, None, ["e.jsonl: empty file: no records"])


def test_csv_problems_have_right_lines_after_multiline_fields(tmp_path):
    path = write(tmp_path, "data.csv", 'text,label\n"two\nlines",pos\n"  ",neg\nok,\nshort\n"a\n\nb",neg\n,\n')
    assert problems_of(path) == ["data.csv:4: text: empty text", "data.csv:5: label: empty label",
                                 "data.csv:6: row has 1 fields but the header has 2",
                                 "data.csv:10: text: empty text", "data.csv:10: label: empty label"]
    assert len(read_records(path, problems=[])) == 2


def test_csv_missing_column_is_one_problem_naming_the_header(tmp_path):
    path = write(tmp_path, "data.csv", "review,stars\nok,3\nbad,1\n")
    assert problems_of(path) == [
        "data.csv:1: the header has no 'text' or 'label' column (found: review, stars); choose columns with "
        "text_column=/label_column= (--text-column/--label-column)"]


def test_csv_invalid_utf8_names_its_line(tmp_path):
    path = write(tmp_path, "data.csv", b"text,label\ngood,pos\nbad \xff,neg\nfine,neg\n")
    assert problems_of(path) == ["data.csv:3: invalid UTF-8 (byte 0xff at column 5)"]
    assert read_records(path, problems=[]) == [{"text": "good", "label": "pos"}, {"text": "fine", "label": "neg"}]


def test_conll_problems(tmp_path):
    path = write(tmp_path, "data.conll", "A B-X\nlonely\n\nC O\nD Z-X\nE I-X\n\nF S-Y\n")
    assert problems_of(path) == ["data.conll:2: expected 'token tag' but found one column 'lonely'",
                                 "data.conll:5: tag 'Z-X' is not IOB/BIOES-shaped (expected O, or B-, I-, E-, S-, "
                                 "L- or U- and a type, e.g. B-PER)"]
    assert read_records(path, problems=[]) == [{"tokens": ["F"], "tags": ["S-Y"]}]  # bad sentences dropped whole


def test_text_invalid_utf8_drops_only_its_paragraph(tmp_path):
    path = write(tmp_path, "corpus.txt", b"one\n\ntw\xc3o\nmore\n\nthree\n")
    problems: list[Problem] = []
    assert [r["completion"] for r in iter_records(path, problems=problems)] == ["one", "three"]
    assert [str(p) for p in problems] == ["corpus.txt:3: invalid UTF-8 (byte 0xc3 at column 3)"]


# ---------------------------------------------------------------------------------------------------------
# empty system and user content: allowed (as OpenAI allows it), with a warning; empty assistant: an error
# ---------------------------------------------------------------------------------------------------------

SYSTEM_WARNING = ("empty system content (allowed, but it renders as an empty system turn; drop the message if "
                  "none is meant)")
USER_WARNING = "empty user content (allowed, but the reply that follows then answers nothing)"


def test_empty_system_content_validates_with_a_warning_naming_file_line_and_field(tmp_path):
    empty_system = msg({"role": "system", "content": ""}, USER, ASSISTANT)
    report = validate(write(tmp_path, "data.jsonl", [CHAT, empty_system]))
    assert (report.ok, report.count, report.problems) == (True, 2, [])
    assert [str(w) for w in report.warnings] == [f"data.jsonl:2: messages[0].content: {SYSTEM_WARNING}"]
    assert str(report).splitlines()[1:] == [f"data.jsonl:2: messages[0].content: {SYSTEM_WARNING}"]
    assert read_records("data.jsonl")[1] == empty_system  # kept as written


def test_empty_user_content_is_a_warning(tmp_path):
    report = validate(write(tmp_path, "data.jsonl", [msg({"role": "user", "content": " \n"}, ASSISTANT)]))
    assert report.ok and [str(w) for w in report.warnings] == [f"data.jsonl:1: messages[0].content: {USER_WARNING}"]


@pytest.mark.parametrize("content", ["", " "])
def test_empty_assistant_content_is_still_an_error(tmp_path, content):
    path = write(tmp_path, "data.jsonl", [CHAT, msg({"role": "system", "content": ""}, USER,
                                                    {"role": "assistant", "content": content})])
    report = validate(path)
    assert [str(p) for p in report.problems] == ["data.jsonl:2: messages[2].content: empty message"]
    assert [str(w) for w in report.warnings] == [f"data.jsonl:2: messages[0].content: {SYSTEM_WARNING}"]
    with pytest.raises(DataError, match="data.jsonl:2: messages.2..content: empty message"):
        read_records(path)


def test_sharegpt_empty_system_and_human_turns_are_warnings(tmp_path):
    row = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": ""},
                             {"from": "gpt", "value": "b"}]}
    path = write(tmp_path, "data.jsonl", [row])
    warnings: list[Problem] = []
    assert list(iter_records(path, problems=[], warnings=warnings)) == [{"messages": [
        {"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}]
    assert [str(w) for w in warnings] == [f"data.jsonl:1: conversations[0].value: {SYSTEM_WARNING}",
                                          f"data.jsonl:1: conversations[1].value: {USER_WARNING}"]


def test_alpaca_empty_instruction_uses_the_input_and_warns_only_when_both_are_empty(tmp_path):
    rows = [{"instruction": "", "input": "Translate: chat", "output": "cat"},
            {"instruction": " ", "input": "", "output": "hi"},
            {"instruction": "i", "output": "o", "history": [["", "Hello"]]}]
    report = validate(write(tmp_path, "data.jsonl", rows))
    assert (report.ok, report.count) == (True, 3)
    assert [str(w) for w in report.warnings] == [
        "data.jsonl:2: instruction: empty instruction and input: the user turn is empty (allowed, but the reply "
        "that follows then answers nothing)", f"data.jsonl:3: history[0][0]: {USER_WARNING}"]
    assert [r["messages"][0] for r in read_records("data.jsonl")] == [
        {"role": "user", "content": "Translate: chat"}, {"role": "user", "content": " "},
        {"role": "user", "content": ""}]


def test_read_records_logs_warnings_in_one_line_and_keeps_them_out_of_problems(tmp_path, caplog):
    empty_system = msg({"role": "system", "content": ""}, USER, ASSISTANT)
    path = write(tmp_path, "data.jsonl", [empty_system] * 3)
    problems: list[Problem] = []
    with caplog.at_level("WARNING", logger="tunesmith.data.formats"):
        assert len(read_records(path, problems=problems)) == 3
    assert problems == []
    assert [r.getMessage() for r in caplog.records] == [
        f"3 warning(s) in data.jsonl, the first: data.jsonl:1: messages[0].content: {SYSTEM_WARNING} "
        "(`tunesmith data validate data.jsonl` lists them all)"]


# ---------------------------------------------------------------------------------------------------------
# hostile input: a file:line problem, never a traceback
# ---------------------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
NESTED = "arrays and objects nested {} deep, more than Python's json module can read"
LONG_INT = "a 5000-digit integer, over Python's limit of 4300 digits (write it as a string)"
NUL = "NUL byte at column {}: text files have none (is this file UTF-16 or binary? tunesmith reads UTF-8)"
LONE = "unpaired surrogate escape \\ud83d is not a Unicode character (half of an emoji cut in two?)"


@pytest.mark.parametrize("bad, expected", [
    (DEEP, f"data.jsonl:2: invalid JSON: {NESTED.format(100_000)} (column 100000)"),
    ('{"messages": ' + DEEP + "}", f"data.jsonl:2: invalid JSON: {NESTED.format(100_001)} (column 100013)"),
    ('{"messages": [], "n": ' + "9" * 5000 + "}", f"data.jsonl:2: invalid JSON: {LONG_INT} (column 23)"),
    ('{"messages": [], "n": -' + "9" * 5000 + "}", f"data.jsonl:2: invalid JSON: {LONG_INT} (column 23)"),
    (b'{"messages"\x00: []}', "data.jsonl:2: " + NUL.format(12)),
    (b'{"messages": "\xff"}', "data.jsonl:2: invalid UTF-8 (byte 0xff at column 15)"),
    ('{"messages": [{"role": "user", "content": "a\\ud83d"}, {"role": "assistant", "content": "b"}]}',
     f"data.jsonl:2: invalid JSON: {LONE} (column 45)"),
    ('"a string"', "data.jsonl:2: record must be a JSON object, got string"),
    ("null", "data.jsonl:2: record must be a JSON object, got null"),
    ("3", "data.jsonl:2: record must be a JSON object, got number"),
    (json.dumps(msg({"role": ["user"], "content": "x"}, ASSISTANT)),
     "data.jsonl:2: messages[0].role: role must be a string, got list"),
    (json.dumps(msg({"role": "x" * 100, "content": "x"}, ASSISTANT)),
     f"data.jsonl:2: messages[0].role: unknown role '{'x' * 60}…' (expected system, user, assistant or tool)"),
])
def test_hostile_jsonl_line_is_a_problem_on_its_line(tmp_path, bad, expected):
    good = json.dumps(CHAT).encode() + b"\n"
    path = write(tmp_path, "data.jsonl", good + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + good)
    report = validate(path)
    assert (report.format, report.count, [str(p) for p in report.problems]) == ("openai-chat", 2, [expected])


def test_valid_json_that_only_looks_hostile_is_read(tmp_path):
    odd = CHAT | {"n": float("9" * 5000 + ".5"), "deep": json.loads("[" * 100 + "]" * 100),
                  "escaped": "\\ud83d and \U0001F600", "nul": "\x00"}
    text = json.dumps(odd).replace('"n": Infinity', '"n": ' + "9" * 5000 + ".5")  # a float has no digit limit
    assert "\\ud83d\\ude00" in text and "\\u0000" in text  # escaped pairs, an escaped backslash and NUL
    assert read_records(write(tmp_path, "data.jsonl", [text])) == [CHAT]


def test_hostile_line_alone_still_names_its_line_when_detection_fails(tmp_path):
    with pytest.raises(DataError) as err:
        detect_format(write(tmp_path, "data.jsonl", DEEP + "\n"))
    assert str(err.value).splitlines()[1:] == [
        f"data.jsonl:1: invalid JSON: {NESTED.format(100_000)} (column 100000)",
        "data.jsonl: no record is a JSON object, so the format cannot be detected"]


@pytest.mark.parametrize("bad, expected", [
    (DEEP, f"data.json:4: invalid JSON: {NESTED.format(100_001)} (column 100002)"),  # its deepest bracket
    ('{"n":\n    ' + "9" * 5000 + "}", f"data.json:5: invalid JSON: {LONG_INT} (column 5)"),
    ('{"instruction": "a\x00"}', "data.json:4: " + NUL.format(21)),
    ('{"instruction": "\\ud83d", "output": "o"}', f"data.json:4: invalid JSON: {LONE} (column 20)"),
])
def test_hostile_json_array_is_a_problem_on_its_line(tmp_path, bad, expected):
    record = json.dumps({"instruction": "i", "output": "o"})
    path = write(tmp_path, "data.json", f"[\n  {record},\n  {record},\n  {bad}\n]\n")
    assert detect_format(path) == "alpaca"
    assert problems_of(path) == [expected]


def test_hostile_first_record_of_a_json_array_names_its_line(tmp_path):
    with pytest.raises(DataError) as err:
        detect_format(write(tmp_path, "data.json", f"[\n{DEEP}\n]"))
    assert str(err.value).splitlines()[1] == f"data.json:2: invalid JSON: {NESTED.format(100_001)} (column 100000)"


@pytest.mark.parametrize("name, content", [
    ("data.jsonl", json.dumps(CHAT) + "\n"), ("data.json", json.dumps([CHAT])), ("data.csv", "text,label\na,b\n"),
    ("data.txt", "para\n"), ("data.conll", "A O\n")])
def test_a_bom_at_the_start_is_accepted(tmp_path, name, content):
    path = write(tmp_path, name, b"\xef\xbb\xbf" + content.encode())
    assert read_records(path) == read_records(write(tmp_path, "plain" + name[4:], content))


def test_nul_bytes_in_line_formats_are_problems_on_their_line(tmp_path):
    assert problems_of(write(tmp_path, "data.csv", b"text,label\na\x00,b\nc,d\n")) == ["data.csv:2: " + NUL.format(2)]
    assert problems_of(write(tmp_path, "corpus.txt", b"one\n\ntw\x00o\n\n3\n")) == ["corpus.txt:3: " + NUL.format(3)]
    assert problems_of(write(tmp_path, "data.conll", b"A O\n\nB\x00 O\n\nC O\n")) == ["data.conll:3: " + NUL.format(2)]
    assert read_records("data.csv", problems=[]) == [{"text": "c", "label": "d"}]
    assert read_records("data.conll", problems=[]) == [{"tokens": [t], "tags": ["O"]} for t in "AC"]


def test_utf16_files_are_named_as_such(tmp_path):
    path = write(tmp_path, "data.csv", "text,label\na,b\n".encode("utf-16-le"))  # no BOM: NULs between ASCII
    assert problems_of(path) == ["data.csv:1: " + NUL.format(2)]
    path = write(tmp_path, "data.jsonl", (json.dumps(CHAT) + "\n").encode("utf-16"))
    assert validate(path).problems[0] == Problem(
        "data.jsonl", 1, None, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")


def test_csv_field_over_the_csv_size_limit_names_the_line_its_row_starts(tmp_path):
    import csv

    limit = csv.field_size_limit()
    path = write(tmp_path, "data.csv", f'text,label\na,b\n"{"x" * (limit + 1)}\nmore",c\nd,e\n')
    assert problems_of(path) == [f"data.csv:3: a field of the row starting here is over the csv module's limit of "
                                 f"{limit} characters (is a quote opened here never closed?)"]


def test_parse_json_turns_every_unreadable_input_into_a_json_decode_error():
    from tunesmith.data.jsonparse import parse_json

    for text, message, column in [(DEEP, NESTED.format(100_000), 100_000), ("9" * 5000, LONG_INT, 1),
                                  ('{"a": [1, "\\ud83d"]}', LONE, 12), ("{oops", None, 2)]:
        with pytest.raises(json.JSONDecodeError) as err:
            parse_json(text)
        assert (message or err.value.msg, err.value.colno) == (err.value.msg, column)
    assert parse_json('{"a": "\\ud83d\\ude00 \\\\ud83d"}') == {"a": "\U0001F600 \\ud83d"}


def test_problem_rendering():
    assert str(Problem("d.jsonl", 3, "messages[1].role", "bad")) == "d.jsonl:3: messages[1].role: bad"
    assert str(Problem("d.jsonl", 3, None, "bad")) == "d.jsonl:3: bad"
    assert str(Problem("d.json", 4, "output", "bad", "record")) == "d.json:record 4: output: bad"
    assert str(Problem("d.jsonl", None, None, "empty file: no records")) == "d.jsonl: empty file: no records"


# ---------------------------------------------------------------------------------------------------------
# streaming and validate
# ---------------------------------------------------------------------------------------------------------

def test_iter_records_streams_and_raises_only_after_the_last_record(tmp_path):
    path = write(tmp_path, "data.jsonl", [CHAT, CHAT | {"id": 2}, "{bad", CHAT])
    records = iter_records(path)
    assert next(records) == CHAT and next(records) == CHAT  # available before line 3 is read
    assert next(records) == CHAT
    with pytest.raises(DataError, match="data.jsonl:3: invalid JSON"):
        next(records)


def test_iter_records_resolves_the_format_eagerly(tmp_path):
    path = write(tmp_path, "data.jsonl", [{"question": "q"}])
    with pytest.raises(DataError):
        iter_records(path)  # no next() needed


def test_missing_file_fails_at_once_with_a_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="^nope.csv: no such file$"):
        iter_records("nope.csv")


def test_data_error_survives_pickling():
    import pickle

    err = DataError([Problem("d.jsonl", 2, "messages", "messages is empty")])
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.problems, str(clone)) == (err.problems, str(err))


def test_validate_reports_without_raising(tmp_path):
    report = validate(write(tmp_path, "data.jsonl", [CHAT, msg(USER), CHAT]))
    assert (report.format, report.kind, report.count, report.ok) == ("openai-chat", "chat", 2, False)
    assert [str(p) for p in report.problems] == ["data.jsonl:2: messages: no assistant turn to learn from"]
    undetectable = validate(write(tmp_path, "odd.jsonl", [{"q": 1}]))
    assert (undetectable.format, undetectable.count, len(undetectable.problems)) == (None, 0, 1)
    assert validate(write(tmp_path, "ok.csv", "text,label\na,b\n"), text_column="text").ok


# ---------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------

def test_completion_chat_completion_is_identity():
    for record in ({"prompt": "2+2=", "completion": " 4"}, {"prompt": "", "completion": "story"}):
        assert to_completion(to_chat(record)) == record
    assert to_chat({"prompt": "Q", "completion": "A"}) == {"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert to_chat({"prompt": "", "completion": "A"}) == {"messages": [{"role": "assistant", "content": "A"}]}


def test_single_turn_chat_completion_chat_is_identity():
    assert to_completion(CHAT) == {"prompt": "Hi?", "completion": "Hello."}
    assert to_chat(to_completion(CHAT)) == CHAT


def test_multi_turn_chat_becomes_a_transcript():
    record = {"messages": [{"role": "system", "content": "Be kind."}, USER, ASSISTANT | {"weight": 0},
                           {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye.", "weight": 1},
                           {"role": "user", "content": "dropped"}]}
    assert to_completion(record) == {
        "prompt": "System: Be kind.\n\nUser: Hi?\n\nAssistant: Hello.\n\nUser: Bye?\n\nAssistant:",
        "completion": " Bye."}
    assert to_completion({"messages": [{"role": "system", "content": "S"}, USER, ASSISTANT]}) == {
        "prompt": "System: S\n\nUser: Hi?\n\nAssistant:", "completion": " Hello."}


def test_same_kind_is_returned_unchanged_and_others_refused():
    completion = {"prompt": "p", "completion": "c"}
    assert to_chat(CHAT) is CHAT and to_completion(completion) is completion
    with pytest.raises(DataError, match="classification records cannot be converted to chat"):
        to_chat({"text": "t", "label": "l"})
    with pytest.raises(DataError, match="tagging records cannot be converted to completion"):
        to_completion({"tokens": ["a"], "tags": ["O"]})


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------

def test_write_jsonl_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(FileExistsError, match="out.jsonl already exists; pass --force"):
        write_jsonl([CHAT], out)
    assert out.read_text() == "precious\n"
    assert write_jsonl([CHAT, {"prompt": "é", "completion": "c"}], out, force=True) == 2
    assert out.read_text(encoding="utf-8").splitlines() == [json.dumps(CHAT), '{"prompt": "é", "completion": "c"}']
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind


def test_write_jsonl_failure_leaves_no_file(tmp_path):
    def records():
        yield CHAT
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(records(), tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_convert_file_streams_every_format_to_chat(tmp_path):
    src = write(tmp_path, "data.json", json.dumps([{"instruction": "Q", "input": "x", "output": "A"}]))
    assert convert_file(src, "out.jsonl", to="chat") == 1
    assert read_records("out.jsonl") == [{"messages": [
        {"role": "user", "content": "Q\n\nx"}, {"role": "assistant", "content": "A"}]}]
    src = write(tmp_path, "corpus.txt", "One.\n\nTwo.\n")
    assert convert_file(src, "out2.jsonl", to="chat") == 2
    assert detect_format("out2.jsonl") == "openai-chat"


def test_convert_file_round_trip(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "c"}]
    convert_file(write(tmp_path, "c.jsonl", rows), "chat.jsonl", to="chat")
    convert_file("chat.jsonl", "back.jsonl", to="completion")
    assert read_records("back.jsonl") == rows


def test_convert_file_writes_nothing_if_any_record_is_bad(tmp_path):
    src = write(tmp_path, "data.jsonl", [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match="data.jsonl:4: completion: empty completion"):
        convert_file(src, "out.jsonl", to="chat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_convert_file_refuses_classification_and_existing_output(tmp_path):
    src = write(tmp_path, "data.csv", "text,label\na,b\n")
    with pytest.raises(DataError, match="data.csv: classification records cannot be converted to chat"):
        convert_file(src, "out.jsonl", to="chat")
    assert not (tmp_path / "out.jsonl").exists()
    src = write(tmp_path, "c.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "taken.jsonl").write_text("keep\n")
    with pytest.raises(FileExistsError, match="--force"):
        convert_file(src, "taken.jsonl", to="chat")
    assert (tmp_path / "taken.jsonl").read_text() == "keep\n"
