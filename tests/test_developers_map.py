"""DEVELOPERS.md's layout map against the tree: every module and package under src/tunesmith/ is on it, and
every path it names exists, so the map fails here the day it goes stale.

Refresh the map after moving modules: `python tests/test_developers_map.py` prints it from the modules'
docstrings (one line each); paste the output over the code block under "## Layout"."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "tunesmith"
WIDTH = 120  # the house's line limit
INDENT = "  "  # a map line is INDENT + path; deeper-indented lines would be continuations


def modules() -> dict[str, Path]:
    """Map name -> file for every module under src/tunesmith/: `data/formats.py`, and `data/` for a package
    (its __init__.py); the top-level __init__.py keeps its name, as the package itself is the map's root."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.endswith("/__init__.py"):
            name = name.removesuffix("__init__.py")
        names[name] = path
    return names


def summary(text: str, room: int) -> str:
    """The docstring's first sentence; when it is longer than `room`, cut at its last clause (a colon,
    semicolon or parenthesis outside `code`) that keeps at least half the room, else at a word, with "…"."""
    sentence = re.split(r"(?<=\.)\s", " ".join(text.split()), maxsplit=1)[0].rstrip(".")
    if len(sentence) <= room:
        return sentence
    depth, code, cut = 0, False, 0
    for i, char in enumerate(sentence[:room + 1]):
        code ^= char == "`"
        depth += (char == "(") - (char == ")")
        if char in ":;(" and depth <= (char == "(") and not code:
            cut = i
    if cut >= room // 2:
        return sentence[:cut].rstrip()
    return sentence[:room].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def render_map() -> str:
    """The map's code block: `src/tunesmith/`, then one line per module with its docstring's first sentence."""
    names = modules()
    column = len(INDENT) + max(map(len, names)) + 2
    lines = ["src/tunesmith/"]
    for name, path in names.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "(no module docstring)"
        lines.append(f"{INDENT}{name}".ljust(column) + summary(doc, WIDTH - column))
    return "\n".join(lines)


def mapped_paths() -> list[str]:
    """The paths DEVELOPERS.md's map names: the first word of each line indented by INDENT exactly, in the
    first code block under "## Layout"."""
    text = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1]
    block = layout.split("```", 2)[1]
    return re.findall(rf"^{INDENT}(\S+)", block, flags=re.MULTILINE)


def test_every_module_is_on_the_map():
    missing = sorted(set(modules()) - set(mapped_paths()))
    assert missing == [], f"not in DEVELOPERS.md's map (refresh it: python {Path(__file__).relative_to(ROOT)})"


def test_every_path_on_the_map_exists():
    named = mapped_paths()
    assert len(named) == len(set(named)), "a path is on the map twice"
    gone = [name for name in named if not (PACKAGE / name).exists() or name.endswith("/") != (PACKAGE / name).is_dir()]
    assert gone == []


def test_every_module_says_what_it_is_for():
    undocumented = [name for name, path in modules().items()
                    if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert undocumented == []


def test_summary_cuts_a_long_sentence_at_a_clause_or_a_word():
    text = "Prompt building: chat rendering (with small named fallbacks, and more), and Jinja2 templates. Rest."
    assert summary(text, 200) == ("Prompt building: chat rendering (with small named fallbacks, and more), and Jinja2 "
                                  "templates")
    assert summary(text, 60) == "Prompt building: chat rendering"
    assert summary(text, 72) == "Prompt building: chat rendering (with small named fallbacks, and more)…"
    assert summary(text, 12) == "Prompt…"


if __name__ == "__main__":
    print(render_map())
