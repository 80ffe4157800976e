"""`compare` end to end on a tiny random model: prompting and trained entries side by side, the report's
table, plots and files, re-runs that skip finished entries, per-entry processes, and the HTML report
rendered by headless Chromium (skipped when Chromium is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.compare import load_compare, run
from tunesmith.config import ConfigError

REVIEWS = [("great movie, loved it", "positive"), ("boring", "negative"), ("it was fine", "neutral"),
           ("loved it", "positive"), ("boring movie", "negative"), ("How can I help you today?", "neutral")]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, bpe):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tunesmith.data.templates import CHAT_TEMPLATES

    root = tmp_path_factory.mktemp("compare")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()),
                                        eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATES["chatml"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    for name, rows in (("train", REVIEWS * 3), ("test", REVIEWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return root


def comparison(assets: Path, out: Path, **extra) -> dict:
    prompting = {"template": "Review: {{ text }} Sentiment:", "format": "completion"}
    return {"title": "Tiny sentiment", "output_dir": str(out),
            "base": {"model": str(assets / "lm"), "task": "classify", "seed": 7, "batch_size": 6, "max_steps": 4,
                     "learning_rate": 1e-2, "eval_steps": 2, "logging_steps": 1, "save_steps": 100,
                     "data": {"train": str(assets / "train.jsonl"), "eval": str(assets / "test.jsonl")}},
            "entries": [{"name": "zero-shot", "prompting": prompting},
                        {"name": "2-shot-calibrated", "prompting": {**prompting, "shots": 2, "calibrate": True}},
                        {"name": "lora", "overrides": {"method": {"name": "lora", "r": 2}}},
                        {"name": "full", "overrides": {"method": {"name": "full"}, "learning_rate": 1e-3}}],
            "isolate": False, **extra}


def test_compare_writes_the_report_and_skips_finished_entries(assets, tmp_path):
    out = tmp_path / "cmp"
    report = run(comparison(assets, out))
    assert {p.name for p in out.iterdir()} == {"compare.yaml", "zero-shot", "2-shot-calibrated", "lora", "full",
                                              "report.md", "report.html", "report.json", "metrics.png", "losses.png"}
    for name in ("zero-shot", "lora"):
        assert {"done", "result.json", "metrics.json", "predictions.jsonl", "entry.json"} <= {
            p.name for p in (out / name).iterdir()}
    assert (out / "metrics.png").read_bytes()[:8] == (out / "losses.png").read_bytes()[:8] == PNG

    header, rows = report["table"]["header"], report["table"]["rows"]
    assert header == ["entry", "kind", "model", "accuracy", "macro_f1", "trainable params", "train s",
                      "train ex/s", "total s", "peak RSS MiB"]
    assert [r[:3] for r in rows] == [["zero-shot", "0-shot", "lm"], ["2-shot-calibrated", "2-shot calibrated", "lm"],
                                     ["lora", "lora", "lm"], ["full", "full", "lm"]]
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["zero-shot"]["trainable_parameters"] == 0
    assert 0 < entries["lora"]["trainable_parameters"] < entries["full"]["trainable_parameters"]
    for e in entries.values():  # every entry is scored on the same 6 eval records
        assert e["metrics"]["examples"] == 6 if "examples" in e["metrics"] else len(
            (out / e["name"] / "predictions.jsonl").read_text().splitlines()) == 6
        assert rows[list(entries).index(e["name"])][3] == f"{e['metrics']['accuracy']:.3f}"
    md = (out / "report.md").read_text()
    assert "| zero-shot | 0-shot | lm |" in md and "![loss curves](losses.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src='losses.png'" not in html

    # An interrupted comparison re-runs only what did not finish.
    (out / "full" / "done").unlink()
    shutil.rmtree(out / "full" / "run")
    logged = []
    again = run(comparison(assets, out), log=logged.append)
    assert logged == ["[1/4] zero-shot: done before, skipped", "[2/4] 2-shot-calibrated: done before, skipped",
                      "[3/4] lora: done before, skipped", "[4/4] full: running"]
    assert again["table"]["rows"][:3] == rows[:3]


def test_each_entry_runs_in_its_own_process_by_default(assets, tmp_path, capsys):
    cfg = comparison(assets, tmp_path / "cmp", isolate=True)
    cfg["entries"] = cfg["entries"][:1]
    path = tmp_path / "compare.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert main(["compare", str(path)]) == 0
    assert "| zero-shot | 0-shot | lm |" in capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "zero-shot" / "result.json").read_text())
    assert result["isolated"] and result["peak_rss_mib"] > 0
    assert "each entry ran in its own process" in (tmp_path / "cmp" / "report.md").read_text()


def test_compare_config_errors_name_the_entry(assets, tmp_path):
    cfg = comparison(assets, tmp_path)
    cfg["entries"][2]["overrides"]["method"]["rank"] = 4
    with pytest.raises(ConfigError, match="^config: entry lora: method.rank: unknown key; known keys: r, alpha"):
        load_compare(cfg)
    cfg = comparison(assets, tmp_path)
    cfg["entries"][3]["overrides"]["seed"] = 1
    with pytest.raises(ConfigError, match="entry full: seed and data.eval are shared"):
        load_compare(cfg)


def test_a_half_written_log_line_leaves_the_report_as_the_whole_lines_make_it(tmp_path):
    """A log.jsonl cut by a kill (or still being written) ends in half a line: the loss curves skip it."""
    from tunesmith.compare import CompareConfig
    from tunesmith.compare.report import write_report

    events = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    whole = "".join(json.dumps(e) + "\n" for e in events)
    for name, log in (("whole", whole), ("cut", whole + '{"step": 3, "lo')):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "log.jsonl").write_text(log)
        cfg = CompareConfig.model_validate({"title": "t", "base": {"task": "classify"}, "entries": [{"name": "lora"}]})
        write_report(cfg, [{"name": "lora", "kind": "lora", "model": "lm", "metrics": {"accuracy": 0.5},
                            "log": str(tmp_path / name / "run" / "log.jsonl"), "isolated": True}], tmp_path / name)
    for file in ("losses.png", "report.md"):
        assert (tmp_path / "cut" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(assets, tmp_path):
    from tunesmith.compare import CompareConfig
    from tunesmith.compare.report import write_report

    out = tmp_path / "report"
    out.mkdir()
    cfg = CompareConfig.model_validate(comparison(assets, out))
    results = [{"name": "zero-shot", "kind": "0-shot", "model": "lm", "metrics": {"accuracy": 0.5, "macro_f1": 0.4},
                "trainable_parameters": 0, "seconds": 1.0, "isolated": True},
               {"name": "lora", "kind": "lora", "model": "lm", "metrics": {"accuracy": 0.8, "macro_f1": 0.75},
                "trainable_parameters": 1234, "seconds": 3.0, "isolated": True}]
    write_report(cfg, results, out)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        chromium = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                   "--no-first-run", f"--user-data-dir={profile}", "--window-size=1000,800",
                                   f"--screenshot={shot}", (out / "report.html").as_uri()],
                                  capture_output=True, text=True, timeout=60)
    assert chromium.returncode == 0, chromium.stderr
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_generation_comparison_with_prompt_tuning(assets, tmp_path):
    chat = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(12)]
    for name, rows in (("chat-train", chat[:8]), ("chat-test", chat[8:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"output_dir": str(tmp_path / "cmp"), "isolate": False,
           "base": {"model": str(assets / "lm"), "task": "sft", "max_steps": 2, "batch_size": 4, "save_steps": 100,
                    "eval_steps": 1, "logging_steps": 1, "eval_max_new_tokens": 4,
                    "data": {"train": str(tmp_path / "chat-train.jsonl"), "eval": str(tmp_path / "chat-test.jsonl")}},
            "entries": [{"name": "1-shot", "prompting": {"shots": 1}},
                        {"name": "prompt", "overrides": {"method": {"name": "prompt", "num_virtual_tokens": 3},
                                                         "learning_rate": 0.1}}]}
    report = run(cfg)
    assert report["table"]["header"][3:5] == ["exact_match", "rouge_l"]
    shot = json.loads((tmp_path / "cmp" / "1-shot" / "predictions.jsonl").read_text().splitlines()[0])
    # the shot's user/assistant turns sit between the system message and the query
    assert [m["role"] for m in shot["input"]["messages"]] == ["system", "user", "assistant", "user"]
    assert shot["gold"] == "It is 16."
    trained = json.loads((tmp_path / "cmp" / "prompt" / "result.json").read_text())
    assert trained["trainable_parameters"] == 3 * 32 and {"bleu", "loss"} <= trained["metrics"].keys()
