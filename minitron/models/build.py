"""Build a transformers causal LM from a preset shape or load a local checkpoint; count
parameters exactly from a config alone (meta device, no weights materialised)."""
import importlib.util
import logging
from pathlib import Path

import torch

from minitron.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# Training/pruning precision names -> the dtype weights are built in.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PRESET_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings")


def resolve_hf_config(cfg: ModelConfig, vocab_size: int, key: str = "model"):
    """The transformers config the job will train: the checkpoint's own, or the preset's shape.
    `key` names the config section in errors (model, teacher, student)."""
    from transformers import AutoConfig

    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise ConfigError(f"{key}.path: {path} is not a Hugging Face checkpoint (no config.json)")
        if not path.exists() and cfg.path.startswith((".", "/", "~")):
            raise ConfigError(f"{key}.path: no such directory: {path}")
        try:
            return AutoConfig.from_pretrained(str(path) if path.exists() else cfg.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}.path: cannot read a config from {cfg.path!r}: {str(e).splitlines()[0]}") from None
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"model.num_key_value_heads: {cfg.num_key_value_heads} does not divide "
                          f"model.num_attention_heads={cfg.num_attention_heads}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads: {cfg.num_attention_heads} does not divide "
                          f"model.hidden_size={cfg.hidden_size}")
    try:
        return AutoConfig.for_model(cfg.family, vocab_size=vocab_size,
                                    **{k: getattr(cfg, k) for k in PRESET_KEYS})
    except ValueError:
        raise ConfigError(f"model.family: unknown transformers model type {cfg.family!r}") from None


def local_checkpoint(path: str, key: str = "model") -> str:
    """A local directory as is; a hub name is fetched into the Hugging Face cache (weights are
    then read, and hashed, from disk)."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:
        raise ConfigError(f"{key}.path: cannot fetch {path!r}: {str(e).splitlines()[0]}") from None


def weight_files(path: str) -> list:
    """A checkpoint directory's weight files (safetensors or PyTorch .bin), sorted."""
    root = Path(path)
    return sorted([*root.glob("*.safetensors"), *root.glob("*.bin")])


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def max_positions(hf_config) -> int:
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 0)


def count_params(hf_config) -> int:
    """Exact parameter count (tied weights counted once) without allocating any weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def choose_attn_implementation(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(cfg: ModelConfig, hf_config, seed: int, dtype: torch.dtype = torch.float32):
    """A causal LM in `dtype`: loaded from `cfg.path`, or freshly initialised from `seed` (a
    preset, or `cfg.init=random` with the checkpoint's architecture)."""
    from transformers import AutoModelForCausalLM

    attn = choose_attn_implementation(cfg.attn_implementation)
    log.info("attention implementation: %s", attn)
    if cfg.path and cfg.init == "pretrained":
        path = Path(cfg.path).expanduser()
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else cfg.path,
                                                     dtype=dtype, attn_implementation=attn)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
    return model
