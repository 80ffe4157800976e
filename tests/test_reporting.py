"""The report kit both reports are written with: number formats, the markdown page exactly, and the HTML page
(escaped, `code` spans, numbers right-aligned, plots embedded so the file stands alone)."""

from __future__ import annotations

import base64
import json

from tunesmith.reporting import Page, Table, fmt, write_files

PNG = b"\x89PNG\r\n\x1a\nnot really a picture"


def test_cells_format_floats_integers_and_missing_values():
    assert [fmt(0.71234), fmt(12.5, 0), fmt(3.25, 1), fmt(1234567), fmt(None), fmt("lm")] == [
        "0.712", "12", "3.2", "1,234,567", "–", "lm"]


def page(tmp_path) -> Page:
    (tmp_path / "a.png").write_bytes(PNG)
    tables = [Table(["entry", "kind", "score"], [["lora", "r<8>", "0.900"]], labels=2),
              Table(["after step", "a"], [["before", "–"]], heading="naive & co")]
    return Page("Demo <1>", "Task `sft & co`, seed 7.", tables, note="A note.", plots={"scores": tmp_path / "a.png"})


def test_markdown_page(tmp_path):
    assert page(tmp_path).markdown() == (
        "# Demo <1>\n\nTask `sft & co`, seed 7.\n\n| entry | kind | score |\n|---|---|---|\n| lora | r<8> | 0.900 |\n\n"
        "## naive & co\n\n| after step | a |\n|---|---|\n| before | – |\n\nA note.\n\n![scores](a.png)\n")


def test_html_page_is_escaped_self_contained_and_written_with_the_json(tmp_path):
    write_files(tmp_path, {"title": "Demo <1>"}, page(tmp_path))
    html = (tmp_path / "report.html").read_text()
    assert "<title>Demo &lt;1&gt;</title>" in html and "<h1>Demo &lt;1&gt;</h1>" in html
    assert "<p>Task <code>sft &amp; co</code>, seed 7.</p>" in html
    assert '<tr><td>lora</td><td>r&lt;8&gt;</td><td class="number">0.900</td></tr>' in html  # two label columns
    assert '<h2>naive &amp; co</h2>' in html and '<tr><td>before</td><td class="number">–</td></tr>' in html
    embedded = f'<img alt="scores" src="data:image/png;base64,{base64.b64encode(PNG).decode()}">'
    assert embedded in html and html.count(" src=") == 1 and "<link" not in html
    assert json.loads((tmp_path / "report.json").read_text()) == {"title": "Demo <1>"}
    assert (tmp_path / "report.md").read_text() == page(tmp_path).markdown()
