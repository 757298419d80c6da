"""Tokenizers: load any Hugging Face tokenizer, or train a byte-level BPE on the training split."""
from pathlib import Path
from typing import List

from minitron.config import ConfigError

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: List[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips), saved in HF format by
    the caller. Deterministic for the same texts and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ConfigError(f"data.vocab_size: must be at least 300 (256 bytes + merges), got {vocab_size}")
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


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"data.tokenizer: no such directory: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: cannot load {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {name_or_path} has no EOS token to separate documents")
    return tok
