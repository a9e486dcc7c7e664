"""A small, deterministic, offline tokenizer builder (byte-level BPE with a ChatML template).

The emulator's live pods, ``kvaware demo`` and the tests need a real Hugging Face tokenizer
without any download. `build_tokenizer` trains a byte-level BPE with the ``tokenizers`` library
on a built-in corpus (generated from fixed word lists with a fixed seed, so every build is byte
for byte identical), adds special tokens (bos/eos and the ChatML markers ``<|im_start|>`` /
``<|im_end|>``) and writes a directory that ``transformers.AutoTokenizer.from_pretrained`` loads:
``tokenizer.json``, ``tokenizer_config.json`` (with a chat template) and
``special_tokens_map.json``. `install_local_tokenizer` puts one under ``<root>/<org>/<name>`` so
that auto-discovery (``tokenizersPoolConfig.local.autoDiscoveryDir``) finds it by model name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BOS_TOKEN",
    "CHAT_MARKERS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PreTokenizerStyle",
    "build_tokenizer",
    "builtin_corpus",
    "chatml_template",
    "install_local_tokenizer",
]

logger = logging.getLogger(__name__)

#: Beginning-of-sequence token (added by the post-processor when ``add_bos_token``).
BOS_TOKEN = "<|begin_of_text|>"
#: End-of-sequence token (also the padding token).
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
#: ChatML and tool-call markers, registered as special tokens.
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")

#: ``bytelevel``: the GPT-2 pre-tokenizer (ByteLevel with its own split regex, no normalizer).
#: ``split``: a Llama-3/Qwen2-style tokenizer: NFC normalizer, a Split regex that groups digits
#: by three and keeps newline runs apart, then ByteLevel without its own regex.
PreTokenizerStyle = Literal["bytelevel", "split"]

# The Llama-3 / Qwen2 family split pattern (contractions, letter runs with one leading
# non-letter, digit groups of at most three, punctuation runs, newline runs, whitespace).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BUILD_MARKER = "kvaware-tokenizer.json"
_BUILDER_VERSION = 1

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have "
    "not has had but were their been more one all also can its new after two first other when "
    "into time only over most such some then these where about many than them there would may "
    "model prompt token tokens block blocks cache cached prefix pod pods router routing score "
    "scores scheduler request requests response latency throughput queue load index memory "
    "server client system user assistant tool message messages chat template function value "
    "engine worker workers batch stream event events replay sequence hash key keys tier gpu cpu "
    "storage network cluster node replica shard lease timeout retry error errors warning debug "
    "quick brown fox jumps lazy dog river mountain city village morning evening garden window "
    "question answer reason because however therefore although while during before between "
    "under above without within through across against among around toward upon"
)
_UNICODE_WORDS = (
    "café naïve façade über Zürich São Paulo Ελληνικά Привет мир 日本語 中文 한국어 "
    "हिन्दी العربية עברית ไทย 😀 🚀 ✓ → … — « » ½ ° € £ ¥"
)
_CODE_LINES = (
    "def score(pods, keys):",
    "    return {pod: len(keys) / total for pod in pods}",
    "for i in range(0, len(tokens), 16):",
    'if __name__ == "__main__":',
    "x = {'model': 'm', 'prompt': \"hello\", 'max_tokens': 128}",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "<div class=\"row\"><span id='a1'>42</span></div>",
    "    // TODO: handle the error case; see issue #1234",
    "std::vector<int> v{1, 2, 3};",
    "$ curl -s http://127.0.0.1:8000/v1/completions -d @body.json",
)


def builtin_corpus(seed: int = 0, sentences: int = 240) -> list[str]:
    """The training corpus: deterministic sentences, code lines, numbers and unicode words.

    Args:
        seed: Seed of the generator (the same seed always yields the same corpus).
        sentences: Number of prose sentences (each about 60 characters).

    Returns:
        Lines of text, a few kilobytes in total.
    """
    rng = random.Random(seed)
    vocabulary = _WORDS.split()
    unicode_words = _UNICODE_WORDS.split()
    lines: list[str] = []
    for i in range(sentences):
        n = rng.randrange(6, 16)
        words = [rng.choice(vocabulary) for _ in range(n)]
        if i % 5 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(unicode_words))
        if i % 7 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randrange(100_000)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:]
        end = rng.choice((".", ".", ".", "?", "!", ":", ";", ","))
        lines.append(sentence + end)
        if i % 11 == 0:
            lines.append(rng.choice(_CODE_LINES))
        if i % 13 == 0:
            lines.append("  ".join(rng.sample(unicode_words, 4)))
    return lines


def chatml_template(bos: bool = False) -> str:
    """A ChatML chat template with tools, tool calls and an ``enable_thinking`` switch.

    Args:
        bos: Start the rendered text with ``{{ bos_token }}`` (as Llama-style templates do).

    Returns:
        The Jinja template text.
    """
    head = "{{- bos_token }}\n" if bos else ""
    return head + _CHATML_BODY


# Messages' content is used as a string (vLLM's "string" content format is detected for it).
_CHATML_BODY = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
{{- '# Tools\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools><|im_end|>\n' }}
{%- elif messages and messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- if not loop.first %}{{- '<|im_start|>system\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}
{%- elif message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\n' }}
{%- if message['content'] %}{{- message['content'] }}{%- endif %}
{%- if message['tool_calls'] is defined %}
{%- for tc in message['tool_calls'] %}
{{- '\n<tool_call>\n' + (tc['function'] | tojson) + '\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""


def _fingerprint(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def build_tokenizer(
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 2048,
    corpus: Iterable[str] | None = None,
    chat_template: str | None = None,
    style: PreTokenizerStyle = "bytelevel",
    add_bos_token: bool = False,
    extra_special_tokens: Sequence[str] = (),
    model_max_length: int = 131_072,
) -> Path:
    """Train a byte-level BPE tokenizer and write a Hugging Face tokenizer directory.

    The result is deterministic for the same arguments, and a directory already holding the
    same build is reused as it is (the build is recorded in ``kvaware-tokenizer.json``).

    Args:
        out_dir: Directory to write (created if missing).
        vocab_size: Target vocabulary size (the 256 byte symbols and the special tokens count).
        corpus: Training lines; None = `builtin_corpus()`.
        chat_template: Jinja chat template stored in ``tokenizer_config.json``;
            None = `chatml_template(bos=add_bos_token)`.
        style: Pre-tokenization style, see `PreTokenizerStyle`.
        add_bos_token: Whether encoding with special tokens prepends the bos token (Llama-style
            post-processor); without it nothing is added (Qwen/GPT-style).
        extra_special_tokens: More special tokens to register.
        model_max_length: Recorded in ``tokenizer_config.json``.

    Returns:
        The directory, loadable with ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: `vocab_size` too small or an unknown `style`.
    """
    # NOTE: long on purpose: 28 lines document the nine build options; the body is ~30 lines.
    # NOTE: imported first so that a missing extra fails here, before any argument check.
    import tokenizers  # noqa: F401

    specials = _checked_specials(style, vocab_size, extra_special_tokens)
    lines = list(corpus) if corpus is not None else builtin_corpus()
    template = chat_template if chat_template is not None else chatml_template(add_bos_token)
    params = {
        "builder": _BUILDER_VERSION,
        "vocab_size": vocab_size,
        "corpus": hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest(),
        "chat_template": template,
        "style": style,
        "add_bos_token": add_bos_token,
        "specials": specials,
        "model_max_length": model_max_length,
    }
    fingerprint = _fingerprint(params)
    out = Path(out_dir)
    if _already_built(out, fingerprint):
        return out
    tok = _train(lines, vocab_size, specials, style, add_bos_token)
    config, special_map = _hf_config(specials, template, add_bos_token, model_max_length)
    _write_atomically(
        out,
        {
            "tokenizer.json": tok.to_str(pretty=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
            _BUILD_MARKER: json.dumps({"fingerprint": fingerprint, "params": params}, indent=2),
        },
    )
    logger.debug("built tokenizer in %s (vocab %d)", out, tok.get_vocab_size())
    return out


def _checked_specials(style: str, vocab_size: int, extra: Sequence[str]) -> list[str]:
    """The special tokens (eos, bos, the chat markers, then `extra` without repeats), once
    `style` and `vocab_size` are checked.

    Raises:
        ValueError: `vocab_size` too small for the byte symbols and the specials, or an unknown
            `style`.
    """
    if style not in ("bytelevel", "split"):
        raise ValueError(f"unknown pre-tokenizer style {style!r} (choose bytelevel or split)")
    specials = [EOS_TOKEN, BOS_TOKEN, *CHAT_MARKERS]
    specials += [t for t in extra if t not in specials]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)}, got {vocab_size}")
    return specials


def _already_built(out: Path, fingerprint: str) -> bool:
    """Whether `out` holds the build `fingerprint` names (its marker file says so)."""
    try:
        return bool(json.loads((out / _BUILD_MARKER).read_text())["fingerprint"] == fingerprint)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _train(
    lines: list[str],
    vocab_size: int,
    specials: list[str],
    style: PreTokenizerStyle,
    add_bos_token: bool,
) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `lines`."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos_token:
        bos_id = tok.token_to_id(BOS_TOKEN)
        template_proc = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
        tok.post_processor = processors.Sequence([byte_level, template_proc])
    else:
        tok.post_processor = byte_level
    return tok


def _hf_config(
    specials: list[str], template: str, add_bos_token: bool, model_max_length: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` of the build."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [t for t in specials if t not in (BOS_TOKEN, EOS_TOKEN)],
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": template,
    }
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": config["additional_special_tokens"],
    }
    return config, special_map


def _write_atomically(out: Path, files: dict[str, str]) -> None:
    """Write each of `files` into `out` (created if missing) under a temporary name, then
    rename: a concurrent reader (another process building the same directory) never sees a
    half-written tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out / name)


def install_local_tokenizer(root: str | os.PathLike[str], model: str, **options: Any) -> Path:
    """Build a tokenizer for `model` under ``<root>/<model>`` (nested ``org/name`` layout).

    Pointing ``tokenizersPoolConfig.local.autoDiscoveryDir`` at `root` then makes it the
    tokenizer of `model`. An existing identical build is reused.

    Args:
        root: Discovery root directory.
        model: Model name, e.g. ``Qwen/Qwen3-32B``.
        **options: Passed to `build_tokenizer`.

    Returns:
        The tokenizer directory.

    Raises:
        ValueError: `model` is empty or would escape `root` (absolute, ``..``).
    """
    parts = [p for p in model.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or model.startswith("/"):
        raise ValueError(f"model name {model!r} cannot be used as a directory under the root")
    return build_tokenizer(Path(root).joinpath(*parts), **options)
