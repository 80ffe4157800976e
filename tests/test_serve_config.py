"""`ServeConfig`, the one spelling of what `tunesmith serve` takes: the flags are its fields (same names and
defaults as documented), their help is the fields' descriptions, and the Python entry validates the same way."""

from __future__ import annotations

import pytest

from tunesmith.cli import build_parser, main
from tunesmith.cli.common import config_from_args
from tunesmith.config import ConfigError
from tunesmith.errors import UsageError
from tunesmith.serve import ServeConfig

FLAGS = {"--model", "--adapter", "--host", "--port", "--api-key", "--api-key-file", "--max-batch", "--max-queue",
         "--context-window", "--conversations", "--max-body-bytes", "--chat-template", "--runs", "--backend",
         "--threads", "--gguf-quant", "--device", "--prefix-cache-mb", "--feedback", "--state-dir",
         "--max-upload-mb", "--max-train-jobs", "--fine-tuning", "--batch-invariance"}


def serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def test_the_flags_are_the_fields_with_their_descriptions_as_help():
    actions = {a.option_strings[0]: a for a in serve_parser()._actions if a.dest != "help"}
    assert set(actions) == FLAGS
    assert {a.dest for a in actions.values()} == set(ServeConfig.model_fields)
    for action in actions.values():
        assert action.help == ServeConfig.model_fields[action.dest].description


def test_no_flags_give_the_documented_defaults():
    config = config_from_args(ServeConfig, build_parser().parse_args(["serve"]))
    assert config == ServeConfig()
    assert (config.model, config.host, config.port, config.max_batch, config.max_queue, config.max_body_bytes,
            config.conversations, config.backend, config.device, config.adapters) == (
        "smollm2-135m-instruct", "127.0.0.1", 8000, 16, 64, 1_000_000, "tunesmith-conversations.sqlite", "torch",
        "auto", {})


def test_a_documented_command_line_parses_as_before(tmp_path):
    argv = ["serve", "--model", "base", "--adapter", "a=runs/x", "--adapter", "runs/y", "--port", "9000",
            "--backend", "llama-cpp", "--threads", "2", "--gguf-quant", "f16", "--max-batch", "1",
            "--context-window", "512", "--runs", str(tmp_path), "--device", "cpu", "--chat-template", "chatml",
            "--batch-invariance", "on"]
    config = config_from_args(ServeConfig, build_parser().parse_args(argv))
    assert config == ServeConfig(model="base", adapters={"a": "runs/x", "y": "runs/y"}, port=9000,
                                 backend="llama-cpp", threads=2, gguf_quant="f16", max_batch=1, context_window=512,
                                 runs=str(tmp_path), device="cpu", chat_template="chatml", batch_invariance="on")
    assert config.engine_options() == {"chat_template": "chatml", "context_window": 512, "device": "cpu",
                                       "max_batch": 1, "max_queue": 64, "prefix_cache_mb": 256, "threads": 2,
                                       "gguf_quant": "f16", "batch_invariance": "on"}


def test_bad_flags_are_one_usage_sentence_naming_each_flag(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "--max-batch", "0", "--port", "70000", "--runs", str(tmp_path / "x")])
    with pytest.raises(UsageError) as err:
        config_from_args(ServeConfig, args)
    assert str(err.value) == ("--port 70000: Input should be less than or equal to 65535; --max-batch 0: Input "
                              f"should be greater than or equal to 1; --runs {tmp_path / 'x'}: no such directory; "
                              "give the directory your runs are in")
    assert main(["serve", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "tunesmith: error: --max-batch 0: Input should be greater than or equal to 1\n"


def test_the_settings_are_built_from_the_config(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    settings = ServeConfig(api_key_file=str(key_file), conversations=":memory:", max_body_bytes=10,
                           runs=str(tmp_path)).settings(env={})
    assert (settings.api_key, settings.conversations, settings.max_body_bytes, settings.runs) == (
        "from-file", ":memory:", 10, str(tmp_path))
    assert ServeConfig().settings(env={"TUNESMITH_API_KEY": " from-env "}).api_key == "from-env"
    assert ServeConfig().settings(env={}).api_key is None


def test_the_python_entry_validates_its_keywords_before_loading_anything():
    from tunesmith.serve import run

    with pytest.raises(ConfigError, match="serve: modle: unknown key; did you mean 'model'"):
        run(modle="x")
    with pytest.raises(ConfigError, match="--threads and --gguf-quant apply to --backend llama-cpp only"):
        run(threads=2, gguf_quant="f16")
    with pytest.raises(ConfigError, match="serve: backend: Input should be 'torch' or 'llama-cpp'"):
        run(ServeConfig(), backend="vllm")
