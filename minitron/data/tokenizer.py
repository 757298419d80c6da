"""Tokenizers: load any Hugging Face tokenizer, or train a byte-level BPE on the training split."""
import json
from pathlib import Path
from typing import List, Optional

from minitron.config import ConfigError

EOS = "<|endoftext|>"
MIN_TRAINED_VOCAB = 300  # the 256 byte tokens and some merges

# The JSON files a Hugging Face tokenizer directory may hold (vocab.json: GPT-2-style slow tokenizers).
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json")


def train_bpe_tokenizer(texts: List[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips), saved in HF format by
    the caller. Deterministic for the same texts and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_TRAINED_VOCAB:
        raise ConfigError(f"data.vocab_size: must be at least {MIN_TRAINED_VOCAB} (256 bytes + merges), "
                          f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def read_json_file(file: Path, key: str):
    """`file` parsed; a file that is not JSON (truncated, or not what its name says) is one line
    naming `key`, not a decoder's traceback."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {file} is not valid JSON ({e}); re-export or re-download it") from None
    except OSError as e:  # unreadable: permissions, a dangling link
        raise ConfigError(f"{key}: cannot read {file} ({e.strerror or e})") from None


def check_tokenizer_files(name_or_path: Optional[str], key: str = "data.tokenizer") -> None:
    """The JSON files of a local tokenizer directory parse (a hub name, or none, is not checked)."""
    if not name_or_path:
        return
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}: no such directory: {path}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file; give the tokenizer's directory")
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_file(path / name, key)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    check_tokenizer_files(name_or_path)  # a missing directory or broken JSON: one line, not a traceback
    path = Path(name_or_path).expanduser()
    try:
        # Explicitly False: left unset, transformers asks on a terminal whether to run a tokenizer's own code.
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: cannot load {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {name_or_path} has no EOS token to separate documents")
    return tok
