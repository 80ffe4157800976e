"""`tunesmith train`, `eval`, `export`, `compare` and `continual`: train runs, score them, take them out, and
the experiments built of several runs."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import runs
from ..errors import UsageError
from .common import model_options, sampling, sampling_options

from .. import compare, continual
from ..continual.report import SUMMARIES
from ..reporting import fmt, markdown_table


def _format_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_comparison(metrics: dict) -> None:
    """Before/after table of the eval metrics a run recorded."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [n for n in dict.fromkeys([*before, *after])
             if isinstance(before.get(n, after.get(n)), (int, float)) and n != "examples"]
    if not names:
        return
    print(f"{'metric':20} {'before':>10} {'after':>10}")
    for name in names:
        print(f"{name:20} {_format_metric(before.get(name, '-')):>10} {_format_metric(after.get(name, '-')):>10}")


def cmd_train(args) -> int:
    from ..training import train

    run = train(args.config, args.overrides, resume=args.resume)
    if run.metrics:
        train_metrics = run.metrics.get("train", {})
        print(f"run saved to {run.path} ({train_metrics.get('wall_seconds', 0):.0f} s of training, "
              f"{train_metrics.get('trainable_parameters', 0):,} trainable parameters)")
        print_comparison(run.metrics)
        _print_next_steps(run.path)
    return 0


def _print_next_steps(run_path) -> None:
    """The two commands to talk to a generative run just made."""
    info = runs.find_run(run_path)
    if info is None or info.task != "sft":
        return
    name, command = Path(run_path).name, _command_name()
    print(f"\nchat with it:  {command} chat --model {run_path}")
    print(f"serve it:      {command} serve --model {info.base_model} --adapter {name}={run_path}\n"
          f"               (OpenAI API on http://127.0.0.1:8000/v1, model name {name!r})")


def _command_name() -> str:
    """`tunesmith` when that is what the shell finds, else the path of this environment's command
    (`.venv/bin/tunesmith` after `make demo`, whose venv the user has not activated)."""
    import shutil

    here = Path(sys.executable).with_name("tunesmith")
    if not here.exists() or shutil.which("tunesmith") == str(here):
        return "tunesmith"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def cmd_export(args) -> int:
    from ..export import export, export_gguf, export_lora_gguf

    if args.gguf and args.lora_only:
        result = export_lora_gguf(args.run, args.output, quant=args.quant or "f32", force=args.force,
                                  verify=not args.no_verify)
        print(f"exported the LoRA adapter of {args.run} to {result.path} ({result.quant}, {result.pairs} adapted "
              f"weights, alpha {result.alpha:g})")
        base = result.base_gguf or "the base model as GGUF"
        print(f"apply it to its base: llama-cli -m {base} --lora {result.path}")
        print(f"verified: {result.verification}" if result.verification else
              "not verified (--no-verify)" if args.no_verify else
              "not verified: checking an adapter needs llama.cpp (make setup-fast)")
        return 0
    if args.gguf:
        result = export_gguf(args.run, args.output, quant=args.quant or "f16", force=args.force,
                             verify=not args.no_verify)
        print(f"exported {args.run} to {result.path} ({result.quant}), with {result.modelfile}")
        print(f"verified: {result.verification}" if result.verification else "not verified (--no-verify)")
        return 0
    if args.quant or args.no_verify or args.lora_only:
        raise UsageError("--quant, --lora-only and --no-verify apply only to --gguf exports")
    out = export(args.run, args.output, merge=args.merge, force=args.force)
    print(f"exported {args.run} to {out}" + (" (adapter merged)" if args.merge else ""))
    return 0


def cmd_eval(args) -> int:
    from ..config import load_prompting
    from ..evaluation import evaluate
    from ..metrics import scalars

    if args.shots and not args.train_data:
        raise UsageError(f"--shots {args.shots} needs --train-data FILE to take the exemplars from")
    prompting = None
    if args.prompting or args.shots or args.calibrate:
        prompting = load_prompting(args.prompting or {}, shots=args.shots, calibrate=args.calibrate or None)
    params = sampling(args)
    result = evaluate(args.model, args.data, task=args.task, prompting=prompting, train_data=args.train_data,
                      output_dir=args.output, limit=args.limit, chat_template=args.chat_template, params=params,
                      normalize=args.normalize, seed=args.seed or 0, device=args.device)
    for name, value in scalars(result.metrics).items():
        print(f"{name:20} {_format_metric(value)}")
    if args.output:
        print(f"metrics and predictions written to {args.output}")
    return 0


def cmd_compare(args) -> int:
    report = compare.run(args.config)
    print(markdown_table(report["table"]["header"], report["table"]["rows"]))
    print(f"report written to {Path(report['output_dir']) / runs.REPORT_HTML}")
    return 0


def cmd_continual(args) -> int:
    report = continual.run(args.config, overrides=args.overrides)
    header = ["strategy", *(label for _, label in SUMMARIES)]
    rows = [[name, *(fmt(s["summary"][key]) for key, _ in SUMMARIES)] for name, s in report["strategies"].items()]
    print(markdown_table(header, rows))
    print(f"report written to {Path(report['output_dir']) / runs.REPORT_HTML}")
    return 0




def add_commands(sub) -> None:
    from ..export import QUANTS

    p = sub.add_parser("train", help="train as a YAML config says; evaluates before and after")
    p.add_argument("config", help="YAML recipe (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. method.r=16")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[model_options("model", "chat_template", "device"), sampling_options(64)],
                       help="score a model or run on held-out data; writes metrics and predictions")
    p.add_argument("--data", required=True, help="held-out data (any format `data validate` reads)")
    p.add_argument("--task", choices=["sft", "classify", "ner"], help="default: the run's, else from the data")
    p.add_argument("-o", "--output", help=f"directory for {runs.METRICS} and {runs.PREDICTIONS}")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--prompting", help="YAML file with prompting settings (template, instruction, verbalizer, "
                                       "format, shots, calibrate); classify on a causal LM uses label words")
    p.add_argument("--shots", type=int, help="k-shot prompting with exemplars from --train-data")
    p.add_argument("--train-data", help="where k-shot exemplars come from")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration of label-word scores")
    p.add_argument("--normalize", action="store_true", help="exact match after lowercasing and dropping punctuation")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a run as a standalone model, a plain peft adapter, or a GGUF file")
    p.add_argument("run")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--gguf", action="store_true", help="write OUTPUT as one GGUF file (adapter merged, the run's "
                   "tokenizer and chat template inside) for llama.cpp/Ollama, and an Ollama Modelfile beside it")
    p.add_argument("--quant", choices=list(QUANTS), help="GGUF weight type (default: f16; with --lora-only, f32)")
    p.add_argument("--lora-only", action="store_true", help="with --gguf: write only the LoRA adapter, as a GGUF "
                   "LoRA that llama.cpp applies to the base model's GGUF (--lora)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the GGUF back and comparing it with the run")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="run several ways to adapt on one task and write a side-by-side report")
    p.add_argument("config", help="comparison YAML (see examples/compare-*.yaml); finished entries are skipped")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("continual", help="learn a sequence of tasks with each strategy and report what was forgotten")
    p.add_argument("config", help="sequence YAML (see examples/continual-support.yaml); finished steps are skipped")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override sequence keys (e.g. output_dir=...)")
    p.set_defaults(func=cmd_continual)
