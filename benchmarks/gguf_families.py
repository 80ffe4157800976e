"""Runs of different model families through `tunesmith export --gguf`: per run and quant type, the writer that wrote
the file (tunesmith's or llama.cpp's converter), the seconds the export took with and without its verification,
and the verification figures per loader (docs/gguf.md's family table).

    .venv/bin/python benchmarks/gguf_families.py RUN [RUN ...] [--quants f16 q8_0 q4_0]

The family runs of tests/test_gguf_families.py are kept by `pytest tests/test_gguf_families.py --basetemp DIR`
(DIR/gguf-families0/*-lora). Each file is exported without verification and then verified, so a quant type over
its tolerance still gets its row (marked "over")."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf

from tunesmith.export import QUANTS, export_gguf, verify_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--quants", nargs="+", choices=list(QUANTS), default=["f16", "q8_0", "q4_0"])
    args = parser.parse_args(argv)

    print("| run | GGUF architecture | quant | writer | export s | verify s | loader | top-1 agreement "
          "| mean KL (nats) | greedy identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            for quant in args.quants:
                out = Path(tmp) / quant / "model.gguf"
                start = time.perf_counter()
                result = export_gguf(run, out, quant=quant, force=True, verify=False)
                exported = time.perf_counter() - start
                architecture = gguf.GGUFReader(out).fields["general.architecture"].contents()
                report = verify_gguf(run, out)
                verified = time.perf_counter() - start - exported
                for c in report.comparisons:
                    verdict = "" if not c.problems(quant) else " (over)"
                    print(f"| {Path(run).name} | {architecture} | {quant} | {result.writer} | {exported:.1f} | "
                          f"{verified:.1f} | {c.backend} | {c.top1:.3f} of {c.positions}{verdict} | {c.kl:.2e} | "
                          f"{c.greedy_same}/{c.prompts} |", flush=True)
                out.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
