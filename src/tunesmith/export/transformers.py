"""Export a run for use without tunesmith: a standalone model that plain transformers loads (LoRA-style
adapters merged into the weights), or the adapter directory that plain peft loads onto its base model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import runs
from ..models import load_run, resolve
from .card import write_card
from .common import ExportError, refuse_existing, refuse_unmergeable


def export(run: str | Path, out: str | Path, *, merge: bool = False, force: bool = False) -> Path:
    """Write `run` to `out` (atomically; an existing `out` is replaced only with force). Returns `out`."""
    out = Path(out)
    if out.resolve() == Path(run).resolve() or Path(run).resolve() in out.resolve().parents:
        raise ExportError(f"{out} is the run itself (or inside it); export to another directory")
    refuse_existing(out, force=force)
    info = runs.open_run(run)
    if merge and not info.peft:
        raise ExportError(f"{run} is a {info.method} run: its weights are already standalone; export without --merge")
    if merge:
        refuse_unmergeable(info, into="the weights", instead="--merge")
    model, tokenizer, _ = load_run(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if merge:
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info.peft and not merge:
            _point_adapter_at_base(tmp, info.base_model)
        # peft's save_pretrained writes its own placeholder README.md: the card replaces it
        write_card(tmp, info, merged=merge)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _point_adapter_at_base(directory: Path, base: str) -> None:
    """peft records the base by the path it was loaded from; make it one plain peft can load again (the
    resolved local directory of an embedded model, or the hub id)."""
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = resolve(base)
    config_file.write_text(json.dumps(config, indent=2))
