"""Models that need no download: ``tiny`` and ``random:gpt2``.

Tests, demos and benchmarks must run on machines that cannot reach the Hugging Face hub,
so the project builds its own models from nothing but code:

* the *tiny tokenizer* is a byte-level BPE trained, deterministically, on a few
  paragraphs of English embedded below. Byte-level means any text can be encoded (the 256
  byte symbols are always in the vocabulary), so it is a real tokenizer, only a small one;
* the *tiny model* is a 2-layer GPT-2 (about 0.26M parameters) with random weights drawn
  from a fixed seed: its text is word salad, but it exercises every code path in ms;
* ``random:gpt2`` has GPT-2-small's exact shape (124M parameters, 50257 logits) with
  seeded random weights, so throughput measured on it is representative of ``gpt2``.

Weights are drawn from a private ``torch.Generator``: building a model never touches the
global torch RNG that callers may have seeded for their own purposes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,  # type: ignore[attr-defined]  # v5: alias of GPT2Tokenizer
)

#: The one special token, GPT-2's document separator; it is BOS, EOS and UNK.
ENDOFTEXT = "<|endoftext|>"
#: Upper bound for BPE training; the corpus is small, so training stops below it.
TINY_VOCAB_LIMIT = 2048
TINY_SEED = 20240613
RANDOM_GPT2_SEED = 1234

# Written for this project and dedicated to the public domain. Varied on purpose (digits,
# punctuation, quotes, a few accented letters) so the merges cover ordinary text.
CORPUS = """\
The river ran slowly past the old mill, and the miller's daughter counted the boats as
they went by. There were twelve on Monday, nine on Tuesday and only three on Wednesday,
because the wind had turned and the water was low. She wrote the numbers in a small blue
book and kept it under the loose board by the window.

In the morning the fields were white with frost. By noon the sun had melted it, and the
cattle came down to the water to drink. A farmer walked along the hedge with his dog,
looking for the gap where the sheep had escaped the night before. "It is always the same
place," he said, "and it is always the same sheep."

A library is a place where people keep books, maps, letters and the memory of a town.
The librarian knew where every volume stood, which pages were torn, and who had borrowed
the atlas in 1987 and never brought it back. Children came on Saturdays to hear stories
about ships, mountains, clever foxes and kings who lost their crowns.

When you send a message across a network, it is cut into small pieces. Each piece finds
its own way from one computer to the next, and at the other end the pieces are put back
together in the right order. If one piece is lost, it is sent again. Nobody in the middle
needs to understand the whole message; each node only has to pass it on.

To make bread, mix flour, water, salt and a little yeast. Knead the dough for ten
minutes, until it is smooth, then leave it in a warm place for an hour. Shape it, let it
rise again, and bake it in a hot oven for about forty minutes. The crust should sound
hollow when you tap it. Good bread takes time; there is no way to hurry it.

The old clock in the square struck seven. Shops opened their shutters, a baker carried
trays of warm rolls to the café, and the first bus of the day turned the corner. Later
there would be noise and traffic, but for now the street was quiet, and the pigeons had it
almost to themselves.

Some questions are easy to ask and hard to answer. Why is the sky blue? How far away is
the nearest star? What makes a good friend? Scientists, poets and children have all tried,
and each of them found a different part of the answer. Learning, it seems, never really
ends; every answer opens another door.

On the hill above the village there was a house with a red roof and a garden full of
apples, pears and plums. In autumn the whole family picked the fruit together: the
grandmother on the ladder, the father holding it steady, and the two boys filling baskets
and eating at least one apple for every five they saved. Nobody minded.

A model reads a sequence of tokens and guesses the next one. It does this again and
again, one token at a time, and the guesses become words, sentences and, with luck,
something worth reading. Small models make strange guesses; large ones make better
guesses, but they need more memory, more time and more power.
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> GPT2TokenizerFast:
    """Train (once per process) the byte-level BPE tokenizer shared by the built-in models.

    BPE training on a fixed text is deterministic: merges are chosen by count, ties broken
    by the pair itself, so every build produces the same vocabulary and token ids.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_LIMIT,
        min_frequency=1,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([CORPUS], trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    tokenizer = GPT2TokenizerFast(
        vocab=backend.get_vocab(),
        merges=merges,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        model_max_length=512,
    )
    tokenizer.pad_token = ENDOFTEXT
    return tokenizer


def random_gpt2(config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    """A GPT-2 of the given shape with weights drawn from ``seed``, in eval mode, float32.

    Building on the ``meta`` device and filling the tensors once is about three times
    faster than the ordinary constructor (which initialises every weight twice), which
    matters for the 124M parameters of ``random:gpt2``. The distribution is GPT-2's own:
    N(0, 0.02) matrices, zero biases, unit layer-norm gains.
    """
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, config.initializer_range, generator=generator)
            elif name.endswith(".weight"):  # layer norm gains
                param.fill_(1.0)
            else:
                param.zero_()
    model.tie_weights()
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()


@functools.lru_cache(maxsize=1)
def tiny_model() -> GPT2LMHeadModel:
    """The built-in 2-layer model (cached per process; treat it as read-only)."""
    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Untied output embeddings: a random model with tied ones mostly repeats its last
        # token, which makes tests of batching and streaming too easy to pass.
        tie_word_embeddings=False,
    )
    return random_gpt2(config, TINY_SEED)


def tiny_decoder(model_type: str = "llama", **overrides: object) -> Any:
    """A 2-layer Llama-family model (``llama``, ``mistral`` or ``qwen2``) over the tiny
    tokenizer, seeded random weights: the lean decoder's test model (``--model tiny-llama``).

    Grouped-query attention (4 query heads on 2 key/value heads) and untied output
    embeddings, like the real models it stands for; N(0, 0.02) matrices, zero biases.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    options: dict[str, object] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    options.update(overrides)
    config = AutoConfig.for_model(model_type, **options)
    with torch.random.fork_rng():  # the constructor's own initialisation, overwritten below
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)  # biases (qwen2's q, k, v)
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()


def random_gpt2_small() -> GPT2LMHeadModel:
    """GPT-2-small's exact shape (``GPT2Config()``: 12 layers, 768 wide, 50257 tokens).

    It is paired with the tiny tokenizer (whose ids all fit in 50257), so its end-of-text
    id is the tiny tokenizer's rather than GPT-2's 50256.
    """
    eos = tiny_tokenizer().eos_token_id
    return random_gpt2(GPT2Config(bos_token_id=eos, eos_token_id=eos), RANDOM_GPT2_SEED)


def init_tiny(directory: str | Path) -> Path:
    """Save the tiny model and tokenizer to ``directory`` in the ``save_pretrained`` format.

    The result loads with ``AutoModelForCausalLM.from_pretrained(directory)`` and
    ``AutoTokenizer.from_pretrained(directory)``, and with ``--model directory``: a way to
    try the whole "local directory" path without any download.
    """
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
