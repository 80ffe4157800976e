"""The GGUF quant types (`--quant`) and what a file of each must show against its run. The tolerances are
measured, not guessed: benchmarks/gguf_quality.py prints the table they come from (docs/gguf.md)."""

from __future__ import annotations

from dataclasses import dataclass

# --quant: (the file's general.file_type, the type of its 2-D weights), as gguf-py names them.
QUANTS = {
    "f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
}

@dataclass(frozen=True)
class Tolerance:
    """What a verified export of one quant type must show against the run, over every position of the prompt
    set (the prompts and the run's own greedy continuations of them)."""
    top1: float  # the least share of positions where the file's most likely next token is the run's
    kl: float  # the largest mean KL(run || file) of the next-token distributions, in nats


# Set from SmolLM2-135M (runs/demo-bf16, a LoRA run on the embedded model; the table is in docs/gguf.md, from
# benchmarks/gguf_quality.py): the worse of the two loaders (transformers, llama.cpp) with a margin, top-1 about
# 0.04-0.15 under the measured share and KL 2-3x over the measured mean. Measured: f16 0.997 / 1.2e-5, bf16
# 0.993 / 7.0e-4, q8_0 0.972 / 7.8e-3, q5_0 0.857 / 0.143, q4_1 0.721 / 0.650, q4_0 0.669 / 0.586 (q5_1 not
# measured: q5_0's bound; f32: the tiny test models' 1.000 / <= 3e-8). A 135M model loses much to 4-5 bit weights,
# so the low-bit bounds are loose: they refuse a grossly wrong file, not a subtly wrong one (tested: a file without
# the q/k rope permutation, on a tiny model whose attention matters, reaches top-1 0.66 / KL 5e-3 and fails f32's).
TOLERANCE = {"f32": Tolerance(1.0, 1e-6), "f16": Tolerance(0.98, 2e-4), "bf16": Tolerance(0.95, 2e-3),
             "q8_0": Tolerance(0.90, 0.02), "q5_1": Tolerance(0.75, 0.35), "q5_0": Tolerance(0.75, 0.35),
             "q4_1": Tolerance(0.55, 1.5), "q4_0": Tolerance(0.55, 1.5)}
# An adapter run's file must also keep what training changed: its KL from the run at most this share of the base
# model's KL from the run. Measured on the demo run over SmolLM2 (base: 0.55 nats from the run): q8_0 0.003 keeps
# it; q4_1 (0.51) rounds the merged weights back onto the embedded base's own Q4_1 grid, and q4_0 (0.59) is
# further from the run than the untrained base, and both halve or zero the run's exact match (docs/gguf.md).
TRAINING_KEPT = 0.5
GREEDY_MUST_MATCH = {"f32"}  # elsewhere rounding may flip a near-tie; the count is reported, not required
# llama.cpp computes parts of every graph in f16 whatever the file's type: its KV cache (by default, as it serves)
# and GELU's lookup table (Gemma's MLP). An f32 file it runs is therefore judged by f16's tolerance, which was
# measured with it; transformers, which reads the file into float32 and computes in float32, keeps f32's. Measured:
# the f32 file of a tiny Llama whose weights are scaled up (largest logit 13) is at mean KL 6.2e-6 from its run in
# llama.cpp with its f16 cache and 4.3e-12 with an f32 one (the first over f32's 1e-6, under f16's 2e-4).
LLAMA_CPP_FLOOR = "f16"


def judged_as(quant: str, backend: str) -> str:
    """The quant type whose TOLERANCE (and GREEDY_MUST_MATCH) a file of type `quant` read by `backend` meets."""
    return LLAMA_CPP_FLOOR if quant == "f32" and backend.startswith("llama.cpp") else quant


FINER = {"q4_0": "q8_0", "q4_1": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0", "q8_0": "f16", "bf16": "f16",
         "f16": "f32"}  # what an error suggests instead
