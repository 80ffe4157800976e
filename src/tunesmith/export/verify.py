"""Verifying a GGUF export against the run it came from. A broken file fails here, not in a user's chat: it is
loaded back (by transformers, and by llama.cpp in a child process when llama-cpp-python is installed) and compared
with the run on a fixed prompt set, exactly for the chat template and token ids, and within the quant type's
tolerance (quants.py) for the next-token distributions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..models import load_run
from .common import ExportError
from .quants import FINER, GREEDY_MUST_MATCH, QUANTS, TOLERANCE, TRAINING_KEPT, judged_as

# A fixed prompt set: chats rendered with the run's own template, and plain text with special tokens, digits
# and non-ASCII bytes, so the tokenizer round trip is exercised too.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Q: 2+2?"}],
    [{"role": "user", "content": "My order arrived damaged. What should I do?"},
     {"role": "assistant", "content": "I'm sorry to hear that! Could you send me your order number?"},
     {"role": "user", "content": "It is 48213."}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Q: 3+1?\nA: 4\n\nQ: 12+30?\nA:",
         "<|im_start|>user\nnaïve café, 🦙 déjà vu<|im_end|>"]
GREEDY_TOKENS = 16


@dataclass
class Comparison:
    """How one loader's logits for the file compare with the run's, over every position of the prompt set."""
    backend: str  # "transformers" or "llama.cpp"
    positions: int
    top1: float  # share of positions whose most likely next token is the run's
    kl: float  # mean KL(run || file) of the next-token distributions, in nats
    max_logit_diff: float  # max |logit(file) - logit(run)|, for information
    logit_scale: float  # max |logit(run)|
    greedy_same: int  # prompts whose greedy continuation (GREEDY_TOKENS) is the run's
    prompts: int
    kl_base: float | None = None  # mean KL(run || base model) over the same positions: adapter runs only

    def problems(self, quant: str) -> list[str]:
        judged = judged_as(quant, self.backend)
        tol, problems = TOLERANCE[judged], []
        what = quant if judged == quant else f"{quant} in llama.cpp, which computes in {judged} in places"
        if self.top1 < tol.top1:
            problems.append(f"{self.backend}: the most likely next token is the run's at only {self.top1:.3f} of "
                            f"{self.positions} positions, below the {tol.top1:g} required for {what}")
        if not self.kl <= tol.kl:  # NaN fails too
            problems.append(f"{self.backend}: the mean KL divergence from the run's next-token distribution is "
                            f"{self.kl:.3g} nats, over the {tol.kl:g} tolerated for {what}")
        if self.kl_base is not None and not self.kl <= TRAINING_KEPT * self.kl_base:
            problems.append(f"{self.backend}: the file lost what training changed: it is {self.kl:.3g} nats from "
                            f"the run, and the base model without the adapter is {self.kl_base:.3g}; a file must "
                            f"be at most {TRAINING_KEPT:g} times as far")
        if judged in GREEDY_MUST_MATCH and self.greedy_same < self.prompts:
            problems.append(f"{self.backend}: greedy continuations differ on {self.prompts - self.greedy_same}/"
                            f"{self.prompts} prompts, where {quant} must reproduce them all")
        return problems

    def __str__(self) -> str:
        return (f"{self.backend}: top-1 agreement {self.top1:.3f} over {self.positions} positions, mean KL "
                f"{self.kl:.2e} nats, max |logit difference| {self.max_logit_diff:.3g} "
                f"({self.max_logit_diff / max(self.logit_scale, 1e-12):.1e} of the largest logit); greedy "
                f"continuations identical on {self.greedy_same}/{self.prompts} prompts"
                + (f"; the base model is {self.kl_base:.2e} nats from the run" if self.kl_base is not None else ""))


@dataclass
class Verification:
    """How the exported file compares with the run: the exact checks (chat template, token ids) and, per
    loader, the logits against TOLERANCE[quant]."""
    quant: str
    comparisons: list[Comparison]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        tol = TOLERANCE[self.quant]
        floor = {judged_as(self.quant, c.backend) for c in self.comparisons} - {self.quant}
        return (f"{self.quant} (tolerance: top-1 agreement >= {tol.top1:g}, mean KL <= {tol.kl:g} nats"
                + "".join(f"; in llama.cpp, {f}'s" for f in floor) + "): " + "; ".join(map(str, self.comparisons)))


# The architectures (general.architecture) transformers' GGUF loader reads exactly: on a tiny random model of each,
# an f32 file gives the model's own logits and the run's token ids. It misreads others, so their files are
# verified by llama.cpp alone: qwen3 (it ignores attention.key_length, so a head size other than hidden / heads
# breaks), gemma2 (logits 1e-2 off), gemma3 (a correct file's top-1 agreement 0.48), phi3 (its role tokens lose
# the right-strip Phi-3's tokenizer gives them, so chat prompts tokenize otherwise), and it refuses smollm3. Nor
# does it read rope scaling (Llama 3.1's rope_freqs tensor: logits 3.5e-3 off on a tiny Llama 3), nor tokenize
# as llama.cpp and the run do with a SentencePiece vocabulary (Mistral's: other ids after "<s>[INST]").
TRANSFORMERS_READS = {"llama", "qwen2"}


def transformers_reads(reader) -> bool:
    """Whether transformers reads the GGUF (a gguf.GGUFReader) as llama.cpp does (TRANSFORMERS_READS)."""
    arch = reader.fields["general.architecture"].contents()
    return (arch in TRANSFORMERS_READS and reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
            and f"{arch}.rope.scaling.type" not in reader.fields
            and not any(t.name.startswith("rope_") for t in reader.tensors))


def verify_gguf(run: str | Path, gguf_path: str | Path, *, lora: str | Path | None = None,
                llama_cpp: bool | None = None) -> Verification:
    """Load `gguf_path` back and compare it with `run` on the fixed prompt set: exactly, the chat template and
    the token ids of every prompt; within TOLERANCE of the file's quant type, the next-token distributions at
    every position of the prompts and of the run's greedy continuations. The loaders are transformers, for the
    architectures it reads (TRANSFORMERS_READS), and llama.cpp: with llama_cpp=True, or None and llama-cpp-python
    installed, or where transformers cannot read the file. With `lora` (a GGUF LoRA adapter for the base model
    `gguf_path`), only llama.cpp can apply it."""
    import gguf

    gguf_path = Path(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    file_type = int(reader.fields["general.file_type"].contents())
    quant = next((q for q, (ft, _) in QUANTS.items() if getattr(gguf.LlamaFileType, ft) == file_type), None)
    if quant is None:
        raise ExportError(f"{gguf_path} is of type {gguf.LlamaFileType(file_type).name}, which has no stated "
                          f"tolerance; verification knows {', '.join(QUANTS)}")
    transformers = lora is None and transformers_reads(reader)
    if llama_cpp is None:
        llama_cpp = has_llama_cpp()
    loaders = [("transformers", _transformers_outputs)] if transformers else []
    if llama_cpp or not transformers:
        loaders.append(("llama.cpp" + (" + LoRA" if lora else ""), _llama_cpp_outputs))
    prompts, tokenizer = _reference(run)

    problems, comparisons = [], []
    for name, load in loaders:
        try:
            template, ids, logits = load(gguf_path, lora, [p.text for p in prompts], [p.full for p in prompts])
        except _LoaderCrashed as err:
            problems.append(str(err))
            continue
        if lora is None and template != tokenizer.chat_template:  # an adapter has none: the base file's applies
            problems.append(f"{name}: its chat template differs from the run's")
        problems += [f"{name}: its tokenizer gives other ids for {p.text[:40]!r}" for p, got in zip(prompts, ids)
                     if got != p.ids]
        comparisons.append(_compare(name, prompts, logits))
        problems += comparisons[-1].problems(quant)
    return Verification(quant, comparisons, problems)


def mismatch_message(report: Verification, out, instead: str | None = "") -> str:
    """The error for a file that failed verification; `instead`: what else to try (default: a finer quant)."""
    if instead == "" and report.quant in FINER:
        instead = f"choose a finer --quant such as {FINER[report.quant]}"
    finer = f", or {instead}" if instead else ""
    return (f"{out} was not written: the GGUF does not match the run ({'; '.join(report.problems)}). Measured: "
            f"{report}. Pass --no-verify to keep such a file anyway{finer}.")


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class _Prompt:
    text: str
    ids: list[int]  # the prompt as the run's tokenizer encodes it
    full: list[int]  # ids + the run's GREEDY_TOKENS greedy tokens
    logits: object  # the run's logits at every position of `full`: (len(full), vocab) float64 numpy
    base_logits: object = None  # the same without the adapter (the base model), for adapter runs


def _reference(run) -> tuple[list[_Prompt], object]:
    """The fixed prompt set with the run's ids, greedy continuations and logits; and the run's tokenizer. The
    run is loaded unmerged: the comparison is with the run as tunesmith itself serves it. For an adapter run, also
    the base model's logits (the adapter disabled) at the same positions."""
    import torch

    model, tokenizer, info = load_run(run)
    texts = _chat_prompts(tokenizer) if tokenizer.chat_template else []
    prompts = []
    for text in texts + TEXTS:
        ids = tokenizer(text).input_ids
        full = _greedy(model, ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0].double().numpy()
            base = None
            if info.peft:
                with model.disable_adapter():
                    base = model(input_ids=torch.tensor([full])).logits[0].double().numpy()
        prompts.append(_Prompt(text, ids, full, logits, base))
    return prompts, tokenizer


def _chat_prompts(tokenizer) -> list[str]:
    """CHATS rendered with the run's template, less those it refuses (Gemma 2's raises on a system message)."""
    from ..data.templates import ChatTemplateError, render_chat

    texts = []
    for chat in CHATS:
        try:
            texts.append(render_chat(tokenizer, chat, add_generation_prompt=True))
        except ChatTemplateError:
            continue
    return texts


def _greedy(model, ids: list[int], steps: int = GREEDY_TOKENS) -> list[int]:
    """`ids` and the `steps` argmax tokens after them, without stopping at EOS: the raw next-token choices."""
    import torch

    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def _compare(backend: str, prompts: list[_Prompt], logits: list) -> Comparison:
    """Teacher-forced on the run's greedy continuations, so the file reproduces a continuation exactly when its
    argmax agrees at each of those positions."""
    import numpy as np

    def log_softmax(x):  # (T, vocab)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    agree, kl, kl_base, max_diff, scale, greedy_same = [], [], [], 0.0, 0.0, 0
    for prompt, got in zip(prompts, logits):
        want, got = prompt.logits, np.asarray(got, dtype=np.float64)  # (T, vocab) each
        same = want.argmax(-1) == got.argmax(-1)  # (T,)
        want_log, got_log = log_softmax(want), log_softmax(got)
        kl.append((np.exp(want_log) * (want_log - got_log)).sum(-1))
        if prompt.base_logits is not None:
            kl_base.append((np.exp(want_log) * (want_log - log_softmax(prompt.base_logits))).sum(-1))
        agree.append(same)
        greedy_same += bool(same[len(prompt.ids) - 1:-1].all())  # position i predicts token i + 1
        max_diff = max(max_diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    agree, kl = np.concatenate(agree), np.concatenate(kl)
    return Comparison(backend, len(agree), float(agree.mean()), float(kl.mean()), max_diff, scale, greedy_same,
                      len(prompts), float(np.concatenate(kl_base).mean()) if kl_base else None)


class _LoaderCrashed(Exception):
    pass


def _transformers_outputs(path: Path, lora, texts: list[str], fulls: list[list[int]]):
    """(chat template, ids of each text, logits at every position of each of `fulls`) of the file as
    transformers reads it (`gguf_file=`: dequantised to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # gguf_file by its absolute path: transformers takes a bare name that exists in the working directory for
    # that file (modeling_utils' "Case 1"), so a model.gguf there would be verified instead of this one.
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=str(path.resolve()))
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(**where)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([full])).logits[0].double().numpy() for full in fulls]
    return tokenizer.chat_template, [tokenizer(text).input_ids for text in texts], logits


def _llama_cpp_outputs(path: Path, lora, texts: list[str], fulls: list[list[int]]):
    """The same as llama.cpp runs the file (llama-cpp-python), with the GGUF LoRA `lora` applied if given. In a
    child process: a llama.cpp build that does not run on this CPU dies of SIGILL, which must not take the
    export (or a test session) with it, and torch's and llama.cpp's thread pools stay apart."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_llama_cpp_child, str(path), lora and str(lora), texts, fulls).result()
        except BrokenProcessPool:
            raise _LoaderCrashed(
                f"llama.cpp: the process running llama-cpp-python died loading or evaluating {path.name} (a "
                "build for another CPU dies like this: reinstall llama-cpp-python on this machine, or pass "
                "--no-verify)") from None
        except ImportError:
            raise _LoaderCrashed(f"llama.cpp: {path.name} can only be verified by llama.cpp, and llama-cpp-python "
                                 "is not installed: run `make setup-fast`, or pass --no-verify") from None
        except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
            raise _LoaderCrashed(f"llama.cpp: {err}") from None


def _llama_cpp_child(path: str, lora: str | None, texts: list[str], fulls: list[list[int]]):
    import gguf
    import numpy as np
    from llama_cpp import Llama

    fields = gguf.GGUFReader(path).fields
    context = int(fields[f"{fields['general.architecture'].contents()}.context_length"].contents())
    # logits_all keeps (n_ctx, vocab) floats: the shortest context that holds the longest prompt of the set (a
    # template with a long default system prompt makes long ones). Run as it is served, with llama.cpp's default
    # f16 KV cache (quants.LLAMA_CPP_FLOOR says how that is judged).
    n_ctx = min(context, -(-max(len(full) for full in fulls) // 64) * 64)
    llm = Llama(model_path=path, lora_path=lora, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    logits = []
    for full in fulls:
        llm.reset()
        llm.eval(full)
        logits.append(np.array(llm.scores[:len(full)], dtype=np.float32))
    ids = [llm.tokenize(text.encode(), add_bos=True, special=True) for text in texts]
    return llm.metadata.get("tokenizer.chat_template"), ids, logits
