"""The Go text/template renderer the Modelfile tests use (tests/gotemplate.py): Go's whitespace trimming, if/else
chains, range with variables and an else, variables assigned inside a loop, short-circuit and/or, and errors for
anything outside the subset; `ollama_values` collates messages as Ollama does."""

from __future__ import annotations

import re

import pytest
from gotemplate import GoTemplateError, ollama_values, render


@pytest.mark.parametrize("source, expected", [
    ("a  {{ 1 }}  b", "a  1  b"),
    ("a  {{- 1 -}}  b", "a1b"),
    ("a \n\t{{- 1 }}\n b", "a1\n b"),
    ("line\n{{- if true }}\nx{{ end -}}\n\n", "line\nx"),
    ("a {{-3}}", "a -3"),  # a dash without a space after it is a negative number, as in Go
])
def test_whitespace_trimming_follows_go(source, expected):
    assert render(source, {}) == expected


def test_if_else_if_else_and_eq_with_several_candidates():
    source = '{{ if eq .Role "system" }}S{{ else if eq .Role "user" "tool" }}U{{ else }}A{{ end }}'
    assert [render(source, {"Role": r}) for r in ("system", "user", "tool", "assistant")] == ["S", "U", "U", "A"]


def test_range_binds_index_and_element_and_sees_the_root_through_dollar():
    source = ('{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}/{{ .Content }}'
              '{{ if eq (len (slice $.Messages $i)) 1 }} last of {{ len $.Messages }}{{ end }};{{ end }}')
    data = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    assert render(source, data) == "0:user/hi;1:assistant/yo last of 2;"


def test_range_else_runs_for_an_empty_list():
    assert render("{{ range .Messages }}x{{ else }}none{{ end }}", {"Messages": []}) == "none"


def test_a_variable_assigned_inside_range_keeps_its_value_across_iterations():
    source = ('{{- $system := .System }}{{ range .Messages }}[{{ if $system }}{{ $system }}|{{ $system = "" }}{{ end }}'
              '{{ .Content }}]{{ end }}')
    data = {"System": "sys", "Messages": [{"Content": "a"}, {"Content": "b"}]}
    assert render(source, data) == "[sys|a][b]"


def test_and_or_short_circuit_and_return_their_deciding_argument():
    assert render("{{ and false .Missing }}", {}) == "false"
    assert render('{{ or "" "fallback" }}', {}) == "fallback"
    assert render("{{ and 1 2 }}", {}) == "2"
    assert render("{{ if not .Think }}off{{ end }}", {"Think": False}) == "off"


def test_string_literals_with_escapes_and_raw_strings():
    assert render(r'{{ "a\nb\"c" }}|{{ `raw\n` }}', {}) == 'a\nb"c|raw\\n'


@pytest.mark.parametrize("source, message", [
    ("{{ if true }}open", "has no {{ end }}"),
    ("{{ end }}", "without an open if or range"),
    ("{{ with .X }}{{ end }}", "`with` is outside the supported subset"),
    ("{{ printf \"%s\" .X }}", "function 'printf' is not defined"),
    ("{{ .Missing }}", "no field 'Missing'"),
    ("{{ $x = 1 }}", "undefined variable $x"),
    ('{{ eq 1 "1" }}', "incompatible types for comparison"),
    ("{{ .Messages }}", "printing list values is outside the supported subset"),
])
def test_anything_outside_the_subset_is_an_error(source, message):
    with pytest.raises(GoTemplateError, match=re.escape(message)):
        render(source, {"X": 1, "Messages": []})


def test_ollama_values_collate_like_ollama():
    values = ollama_values([{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
                            {"role": "user", "content": "q1"}, {"role": "user", "content": "q2"},
                            {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}])
    assert values["System"] == "A\n\nB"
    assert [(m["Role"], m["Content"]) for m in values["Messages"]] == [
        ("system", "A\n\nB"), ("user", "q1\n\nq2"), ("tool", "r1"), ("tool", "r2")]
    assert (values["Think"], values["IsThinkSet"]) == (False, False)
    assert (ollama_values([], think=False)["IsThinkSet"], ollama_values([], think=True)["Think"]) == (True, True)


def test_a_chatml_template_renders_the_exact_prompt():
    source = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n'
              '{{- range .Messages }}\n{{- if eq .Role "user" "assistant" }}<|im_start|>{{ .Role }}\n'
              '{{ .Content }}<|im_end|>\n{{ end }}\n{{- end }}<|im_start|>assistant\n')
    values = ollama_values([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert render(source, values) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                      "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                                      "<|im_start|>assistant\n")
