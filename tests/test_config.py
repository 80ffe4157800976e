"""Run configuration: errors name the file, line and key (with a suggestion), overrides are typed and nested,
methods are told apart by `name`, the resolved config round-trips, and every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import (AdaLoraMethod, ConfigError, FreezeMethod, FullMethod, IA3Method, LoraMethod,
                              PrefixMethod, PromptMethod, TrainConfig, dump_config, load_config, parse_overrides,
                              save_config)

ROOT = Path(__file__).resolve().parents[1]
DATA = {"train": "train.jsonl"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error(source, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(source, overrides)
    return str(caught.value).splitlines()


# ---------------------------------------------------------------------------------------------------------
# errors: file, line, key, and what to do
# ---------------------------------------------------------------------------------------------------------

def test_unknown_keys_name_file_line_and_the_key_meant(tmp_path):
    path = write(tmp_path / "run.yaml", """\
model: tiny
data:
  train: train.jsonl
  eval_fracton: 0.2
method:
  name: lora
  dropuot: 0.1
learning_rte: 1.0e-4
eval_steps: 5
early_stopping:
  metrc: eval_loss
""")
    assert error(path) == [
        f"{path}:4: data.eval_fracton: unknown key; did you mean 'eval_fraction'?",
        f"{path}:7: method.dropuot: unknown key; did you mean 'dropout'?",
        f"{path}:11: early_stopping.metrc: unknown key; did you mean 'metric'?",
        f"{path}:8: learning_rte: unknown key; did you mean 'learning_rate'?",
    ]


def test_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: train.jsonl\nmethod:\n  name: freeze\n  r: 4\n")
    assert error(path) == [f"{path}:5: method.r: unknown key; known keys: train_layers, train_head, name"]


def test_invalid_values_name_their_line(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: train.jsonl\nlearning_rate: fast\nbatch_size: 0\n")
    assert error(path) == [
        f"{path}:3: learning_rate: Input should be a valid number, unable to parse string as a number",
        f"{path}:4: batch_size: Input should be greater than 0",
    ]


def test_invalid_yaml_names_its_line(tmp_path):
    path = write(tmp_path / "run.yaml", "model: tiny\ndata:\n  train: train.jsonl\n   eval: [oops\n")
    assert error(path) == [f"{path}:4: invalid YAML: mapping values are not allowed here"]


def test_a_config_is_a_mapping_in_an_existing_file(tmp_path):
    assert error(write(tmp_path / "list.yaml", "- a\n- b\n")) == [
        f"{tmp_path / 'list.yaml'}: a config is a mapping of keys to values, not a list"]
    assert error(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: no such config file"]


# ---------------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------------

def test_overrides_nest_and_parse_values_as_yaml():
    assert parse_overrides(["method.r=16", "data.train=x.jsonl", "packing=true", "seed=007", "model=",
                            "method.target_modules=[q_proj, v_proj]"]) == {
        "method": {"r": 16, "target_modules": ["q_proj", "v_proj"]}, "data": {"train": "x.jsonl"},
        "packing": True, "seed": 7, "model": ""}


def test_overrides_apply_on_top_of_the_file_with_types(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: train.jsonl\nmethod:\n  name: lora\n  r: 4\n")
    cfg = load_config(path, ["method.r=16", "method.dora=true", "learning_rate=1e-4", "data.eval=held.jsonl",
                             "method.target_modules=[q_proj, v_proj]"])
    assert cfg.method == LoraMethod(name="lora", r=16, dora=True, target_modules=["q_proj", "v_proj"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert (cfg.data.train, cfg.data.eval) == ("train.jsonl", "held.jsonl")  # the rest of `data` is kept


def test_method_shorthand_replaces_the_whole_method(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: train.jsonl\nmethod:\n  name: lora\n  r: 4\n")
    assert load_config(path, ["method=full"]).method == FullMethod(name="full")
    assert load_config({"data": DATA, "method": "ia3"}).method == IA3Method(name="ia3")
    # Changing only the name keeps the old method's keys, which the new one does not know.
    assert error(path, ["method.name=freeze"]) == [
        f"{path}:5: method.r: unknown key; known keys: train_layers, train_head, name"]


def test_overrides_of_a_sequence_merge_into_its_nested_mappings():
    """`tunesmith continual SEQUENCE.yaml key=value`: an override replaces only the keys it names."""
    from tunesmith.config import merge
    from tunesmith.continual.config import load_sequence

    base = {"base": {"max_steps": 40, "method": {"name": "lora", "r": 16}}, "title": "t"}
    assert merge(base, {"base": {"method": {"r": 4}}, "title": {"x": 1}}) == {
        "base": {"max_steps": 40, "method": {"name": "lora", "r": 4}}, "title": {"x": 1}}
    assert base["base"]["method"]["r"] == 16  # neither argument changes
    recipe = ROOT / "examples/continual-support.yaml"
    cfg = load_sequence(recipe, ["output_dir=elsewhere", "base.max_steps=3", "base.method.r=4"])
    original = load_sequence(recipe)
    assert (cfg.output_dir, cfg.base["max_steps"], cfg.base["method"]) == (
        "elsewhere", 3, {**original.base["method"], "r": 4})
    assert {**cfg.base, "max_steps": 40, "method": original.base["method"]} == original.base


def test_bad_override_says_what_an_override_looks_like():
    assert error({"data": DATA}, ["method.r"]) == [
        "override 'method.r' is not key=value (e.g. learning_rate=1e-4 or method.r=16)"]


# ---------------------------------------------------------------------------------------------------------
# methods and cross-field rules
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("full", FullMethod), ("freeze", FreezeMethod), ("lora", LoraMethod),
                                       ("adalora", AdaLoraMethod), ("ia3", IA3Method), ("prefix", PrefixMethod),
                                       ("prompt", PromptMethod)])
def test_method_is_chosen_by_name(name, cls):
    assert type(load_config({"data": DATA, "method": {"name": name}}).method) is cls


def test_default_method_is_lora():
    assert load_config({"data": DATA}).method == LoraMethod(name="lora")


def test_method_keys_belong_to_the_named_method():
    assert error({"data": DATA, "method": {"name": "lora", "init_r": 8}}) == [
        "config: method.init_r: unknown key; known keys: r, alpha, dropout, target_modules, dora, rslora, name"]
    assert load_config({"data": DATA, "method": {"name": "adalora", "init_r": 8}}).method.init_r == 8
    assert error({"data": DATA, "method": {"name": "qlora"}}) == [
        "config: method: Input tag 'qlora' found using 'name' does not match any of the expected tags: 'full', "
        "'freeze', 'lora', 'adalora', 'ia3', 'prefix', 'prompt'"]


def test_early_stopping_needs_eval_steps():
    assert error({"data": DATA, "early_stopping": {"patience": 2}}) == [
        "config: (top level): early_stopping needs eval_steps (how often to evaluate)"]
    cfg = load_config({"data": DATA, "early_stopping": {"patience": 2}, "eval_steps": 10})
    assert cfg.early_stopping.metric == "eval_loss"


@pytest.mark.parametrize("settings, message", [
    ({"task": "classify", "packing": True}, "packing only applies to task: sft"),
    ({"method": "prompt", "packing": True}, "packing does not work with prompt tuning; set packing: false"),
    ({"method": "prefix", "packing": True}, "packing does not work with prefix tuning; set packing: false"),
    ({"task": "ner", "method": "prefix"}, "prefix tuning is not supported for ner by peft; use prompt or lora"),
])
def test_combinations_that_cannot_train_are_refused(settings, message):
    assert error({"data": DATA, **settings}) == [f"config: (top level): {message}"]


def test_packing_with_lora_is_fine():
    assert load_config({"data": DATA, "packing": True}).packing


# ---------------------------------------------------------------------------------------------------------
# the resolved config: saved with every run, loads back to the same thing
# ---------------------------------------------------------------------------------------------------------

def test_resolved_config_round_trips(tmp_path):
    cfg = load_config({"model": "some/dir", "task": "classify", "data": {"train": "t.csv", "text_column": "body"},
                       "method": {"name": "adalora", "init_r": 8, "target_modules": ["query", "value"]},
                       "learning_rate": 3e-5, "eval_steps": 10,
                       "early_stopping": {"metric": "eval_accuracy", "patience": 2}})
    path = tmp_path / "train_config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    saved = yaml.safe_load(path.read_text())
    # Resolved: every field is written, defaults included, so the run does not depend on future defaults.
    assert saved.keys() == TrainConfig.model_fields.keys()
    assert saved["method"] == {"name": "adalora", "init_r": 8, "target_r": 4, "tinit": None, "tfinal": None,
                               "delta_t": 1, "alpha": 16.0, "dropout": 0.0, "target_modules": ["query", "value"],
                               "orth_reg_weight": 0.5}
    assert saved["learning_rate"] == 3e-5 and saved["early_stopping"]["greater_is_better"] is None
    assert dump_config(load_config(path)) == path.read_text()


# ---------------------------------------------------------------------------------------------------------
# shipped recipes
# ---------------------------------------------------------------------------------------------------------

def test_every_example_recipe_loads():
    """Every YAML recipe under examples/ is a valid config whose data files exist (paths from the repo root).
    Passes vacuously while no recipe has been written yet."""
    from tunesmith.compare import entry_config, load_compare
    from tunesmith.continual.config import load_sequence

    recipes = sorted({*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("examples/**/*.yml")})
    for recipe in recipes:
        if recipe.name.startswith("compare-"):  # a comparison: every entry is a valid TrainConfig
            comparison = load_compare(recipe)
            configs = [entry_config(comparison, comparison.entries[0])]
        elif recipe.name.startswith("continual-"):  # a sequence: every task's data (each step validates on load)
            configs = [load_config({"data": {"train": t.train, "eval": t.eval}}) for t in load_sequence(recipe).tasks]
        else:
            configs = [load_config(recipe)]
        for cfg in configs:
            for data in filter(None, (cfg.data.train, cfg.data.eval)):
                assert (ROOT / data).is_file(), f"{recipe.relative_to(ROOT)}: data file {data} does not exist"


@pytest.mark.parametrize("objective, train, continues", [("dpo", "train.jsonl", True), ("orpo", "train.jsonl", False),
                                                         ("kto", "thumbs.jsonl", True)])
def test_preference_recipes_hold_out_pairs_and_continue_the_demo_run(objective, train, continues):
    """The preference demo: each recipe holds the support-prefs test pairs out (preference accuracy before and
    after); dpo and kto continue the support-chat demo run at the path its recipe writes (so metrics.json also
    scores that run's task, on the eval data of its saved config), orpo starts from the base the demo tunes."""
    cfg = load_config(ROOT / f"examples/preference-{objective}.yaml")
    demo = load_config(ROOT / "examples/chat-lora.yaml")
    assert cfg.task == "preference" and cfg.preference.objective == objective
    assert (cfg.data.train, cfg.data.eval) == (f"examples/data/support-prefs/{train}",
                                               "examples/data/support-prefs/test.jsonl")
    assert cfg.continue_from == (demo.output_dir if continues else None)
    assert cfg.model == demo.model and cfg.method.name == demo.method.name
    assert cfg.output_dir == f"runs/preference-{objective}"


def test_preference_demo_target_continues_the_newest_finished_demo_run(tmp_path):
    """`make preference-demo` passes the newest runs/support-chat-lora-* holding a run.json as continue_from (a run
    still training, or one that failed, has none) and stops with a sentence when there is none."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name, finished in [("20261201-100000", True), ("20261203-100000", True), ("20261204-100000", False)]:
        (tmp_path / "runs" / f"support-chat-lora-{name}").mkdir(parents=True)
        if finished:
            (tmp_path / "runs" / f"support-chat-lora-{name}" / "run.json").write_text("{}")

    def make(*args):
        return subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-o", "setup", *args], cwd=tmp_path,
                              capture_output=True, text=True)

    dry = make("-n", "preference-demo", "PREFERENCE=examples/preference-kto.yaml")
    assert dry.returncode == 0, dry.stderr
    assert ("tunesmith train examples/preference-kto.yaml continue_from=runs/support-chat-lora-20261203-100000 "
            "\\\n\toutput_dir=runs/preference-kto-$(date +%Y%m%d-%H%M%S)") in dry.stdout
    for run in (tmp_path / "runs").glob("*/run.json"):
        run.unlink()
    refused = make("preference-demo")
    assert refused.returncode != 0
    assert "no finished runs/support-chat-lora-* run to continue: run make demo first" in refused.stderr
