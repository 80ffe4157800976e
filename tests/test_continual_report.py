"""The forgetting report's summaries against hand-computed values on a fixed matrix, and the files it writes."""

import json

import pytest

from tunesmith.continual.report import write_report
from tunesmith.continual.summary import summarize

# Three tasks; row i is after step i (which trains task i), column j is task j.
R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.9]]
BASE = [0.0, 0.1, 0.1]


def test_summaries_equal_hand_computed_values():
    s = summarize(R, BASE)
    assert s["average_score"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # BWT: final minus just-trained, for the tasks before the last.
    assert s["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # FWT: the score a task had just before its own step, minus the untrained model's.
    assert s["forward_transfer"] == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    # Forgetting: best score before the last step (from the step that trained it on) minus the final one.
    assert s["forgetting"] == pytest.approx([0.9 - 0.5, 0.8 - 0.7])
    assert s["average_forgetting"] == pytest.approx(0.25)


def test_forgetting_ignores_scores_from_before_a_task_was_trained():
    # Task 1 scored 0.95 after step 0 (before it was trained) — not a score it "forgot".
    s = summarize([[0.5, 0.95], [0.5, 0.6]], [0.0, 0.0])
    assert s["forgetting"] == pytest.approx([0.0])
    assert s["backward_transfer"] == pytest.approx(0.0)
    assert s["forward_transfer"] == pytest.approx(0.95)


def test_one_task_has_no_transfer_and_a_missing_score_is_not_averaged_away():
    assert summarize([[0.7]], [0.2]) == {"average_score": 0.7, "average_forgetting": None,
                                         "backward_transfer": None, "forward_transfer": None, "forgetting": []}
    s = summarize([[0.9, None], [0.5, 0.8]], [0.1, None])
    assert s["forward_transfer"] is None and s["backward_transfer"] == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="T x T"):
        summarize([[0.9, 0.1]], [0.1])


def test_report_writes_matrix_summaries_and_plots(tmp_path):
    strategies = {"naive": {"base": BASE, "matrix": R},
                  "replay": {"base": BASE, "matrix": [[0.9, 0.1, 0.2], [0.85, 0.8, 0.3], [0.8, 0.75, 0.85]],
                             "probe": [{"mean_logprob": -0.2, "reproduced": 1.0},
                                       {"mean_logprob": -0.5, "reproduced": 0.5}]}}
    data = write_report("Demo", ["a", "b", "c"], ["exact_match"] * 3, strategies, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "report.html", "matrix.png",
                                                     "curves.png"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["strategies"]["naive"]["matrix"] == R
    assert saved["strategies"]["replay"]["summary"]["average_forgetting"] == pytest.approx(((0.9 - 0.8) + 0.05) / 2)
    assert data["strategies"]["naive"]["summary"]["backward_transfer"] == pytest.approx(-0.25)
    md = (tmp_path / "report.md").read_text()
    assert "| naive | 0.700 | 0.250 | -0.250 | 0.100 | – | – |" in md  # naive has no probe rows
    assert "| 3. c | 0.500 | 0.700 | 0.900 |" in md
    assert "| replay | 0.800 | 0.075 | -0.075 | 0.100 | -0.500 | 0.500 |" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<td>before</td>" in page
