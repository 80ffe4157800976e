"""How close each GGUF quant type of a run stays to the run itself: top-1 agreement and mean KL divergence of the
next-token distributions over `tunesmith export --gguf`'s fixed prompt set, the largest logit difference, and
the file size; per loader (transformers, and llama.cpp when llama-cpp-python is installed). The tolerances in
export/quants.py (TOLERANCE) are set from this table (docs/gguf.md).

    .venv/bin/python benchmarks/gguf_quality.py RUN [--quants f16 q8_0 q5_0 q4_1 q4_0] [--keep DIR]

Each file is exported without verification and then verified, so a quant type over its tolerance still gets
its row (marked "over").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tunesmith.export import QUANTS, TOLERANCE, export_gguf, verify_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--quants", nargs="+", choices=list(QUANTS), default=["f16", "q8_0", "q5_0", "q4_1", "q4_0"])
    parser.add_argument("--keep", help="write the files into this directory and keep them")
    args = parser.parse_args(argv)

    print("| quant | loader | top-1 agreement | mean KL (nats) | max logit diff (of largest) | greedy identical "
          "| file MB | tolerance (top-1 / KL) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            out = Path(args.keep or tmp) / quant / "model.gguf"
            export_gguf(args.run, out, quant=quant, force=True, verify=False)
            report = verify_gguf(args.run, out)
            size = out.stat().st_size / 1e6
            tol = TOLERANCE[quant]
            for c in report.comparisons:
                verdict = "" if not c.problems(quant) else " (over)"
                print(f"| {quant} | {c.backend} | {c.top1:.3f} of {c.positions} | {c.kl:.2e} | "
                      f"{c.max_logit_diff:.3g} ({c.max_logit_diff / c.logit_scale:.1e}) | "
                      f"{c.greedy_same}/{c.prompts} | {size:.0f} | {tol.top1:g} / {tol.kl:g}{verdict} |", flush=True)
            if report.problems:
                print(f"<!-- {quant}: {'; '.join(report.problems)} -->", flush=True)
            if not args.keep:
                out.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
