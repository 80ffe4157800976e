"""Shared test fixtures: tiny tokenizers and models built in seconds, offline, with the same code paths as
the real embedded models."""

from __future__ import annotations

import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

# A small corpus, repeated so that frequent pieces (" Paris", " 4", "\n\n") become single BPE tokens.
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Q: 2+2?\nA: 4\n\nQ: 3+1?\nA: 4",
    "You are a helpful assistant. Hello! How can I help you today?",
    "system user assistant\n\nUser: hi\n\nAssistant: hello",
    "Review: great movie, loved it. Sentiment: positive. Review: boring. Sentiment: negative.",
] * 20

# SmolLM2-135M-Instruct's own template, copied from the GGUF: it injects a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _threads(request):
    """One intra-op thread for tiny models (thread hand-off costs more than their matmuls); the real
    embedded models in integration tests keep torch's default."""
    import torch

    default = torch.get_num_threads()
    if request.node.get_closest_marker("integration") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(default)


@pytest.fixture(scope="session")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _wrap(bpe, **kwargs):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def chatml_tokenizer(bpe):
    """Like SmolLM2: ChatML template with an injected default system prompt, EOS = <|im_end|>."""
    return _wrap(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)


@pytest.fixture
def llama3_tokenizer(bpe):
    """Llama-3 style: BOS in the template, header tokens, content trimmed, EOS = <|eot_id|>."""
    from tunesmith.data.templates import CHAT_TEMPLATES

    return _wrap(bpe, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>",
                 chat_template=CHAT_TEMPLATES["llama3"])


@pytest.fixture
def plain_tokenizer(bpe):
    """A base-model tokenizer with no chat template and only an EOS token."""
    return _wrap(bpe, eos_token="<|endoftext|>")


def build_tiny_llama(tokenizer, seed: int = 0, **config):
    """A randomly initialised 2-layer Llama (hidden 32) with `tokenizer`'s vocabulary and special ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))


@pytest.fixture
def tiny_lm(chatml_tokenizer):
    """A randomly initialised 2-layer Llama with the tiny tokenizer's vocabulary."""
    return build_tiny_llama(chatml_tokenizer).eval()


@pytest.fixture
def model_dir(tmp_path, tiny_lm, chatml_tokenizer):
    """The tiny Llama and ChatML tokenizer saved as a plain transformers directory (a model "name")."""
    path = tmp_path / "tiny-model"
    tiny_lm.save_pretrained(path)
    chatml_tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Tokenizers whose turns end with something other than EOS, all sharing one vocabulary of special tokens,
# so every template's markers are special tokens in every one of them (what user data must never forge).
# ---------------------------------------------------------------------------------------------------------

EXTRA_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|end_of_text|>"]

# Llama-3.1's layout: a system header with a date, printed even without a system message; content trimmed.
LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n' + system + '<|eot_id|>' }}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 3's layout: assistant is "model", the system message is folded into the first user turn, user and
# model content is trimmed, and turns end with <end_of_turn> while EOS is <eos>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _wrap_all_specials(bpe, **kwargs):
    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_special_tokens(EXTRA_SPECIALS)
    return _wrap(extended, **kwargs)


@pytest.fixture
def bare_chatml_tokenizer(bpe):
    """ChatML with no default system prompt, EOS = <|im_end|>."""
    from tunesmith.data.templates import CHAT_TEMPLATES

    return _wrap_all_specials(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                              chat_template=CHAT_TEMPLATES["chatml"])


@pytest.fixture
def smollm2_tokenizer(bpe):
    """SmolLM2's template (injects a default system prompt), EOS = <|im_end|>."""
    return _wrap_all_specials(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)


@pytest.fixture
def llama31_tokenizer(bpe):
    """Llama-3.1 style: date header, turns end with <|eot_id|>, EOS = <|end_of_text|>."""
    return _wrap_all_specials(bpe, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
                              chat_template=LLAMA31_TEMPLATE)


@pytest.fixture
def gemma_tokenizer(bpe):
    """Gemma style: turns end with <end_of_turn>, EOS = <eos>, BOS = <bos>."""
    return _wrap_all_specials(bpe, eos_token="<eos>", bos_token="<bos>", chat_template=GEMMA_TEMPLATE)


# Phi-3-mini's template: turns end with <|end|> and the whole conversation with EOS (<|endoftext|>), so earlier
# turns are not prefixes of the whole; its role and end tokens strip the whitespace to their right.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture
def phi3_tokenizer(bpe):
    """Phi-3 style: rstrip control tokens, turns end with <|end|>, EOS = <|endoftext|>."""
    from tokenizers import AddedToken

    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_special_tokens(EXTRA_SPECIALS + [AddedToken(t, rstrip=True, normalized=False, special=True)
                                                  for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")])
    return _wrap(extended, eos_token="<|endoftext|>", chat_template=PHI3_TEMPLATE)
