"""Build a transformers causal LM from a preset shape or load a local checkpoint; count
parameters exactly from a config alone (meta device, no weights materialised)."""
import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from minitron.config import ConfigError, ModelConfig
from minitron.data.tokenizer import read_json_file

log = logging.getLogger(__name__)

# Training/pruning precision names -> the dtype weights are built in.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# safetensors' own limit on a header; a larger length means the file is something else.
SAFETENSORS_MAX_HEADER = 100_000_000

PRESET_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings")


def resolve_hf_config(cfg: ModelConfig, vocab_size: int, key: str = "model"):
    """The transformers config the job will train: the checkpoint's own, or the preset's shape.
    `key` names the config section in errors (model, teacher, student)."""
    from transformers import AutoConfig

    if cfg.path:
        path = Path(cfg.path).expanduser()
        check_remote_code(read_json_object(config_json(cfg.path, key), f"{key}.path"), cfg, key)
        try:
            return AutoConfig.from_pretrained(str(path) if path.exists() else cfg.path,
                                              trust_remote_code=cfg.trust_remote_code)
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


def with_tokenizer_ids(hf_config, tokenizer):
    """A preset's config with the tokenizer's special token ids in place of transformers'
    placeholders (bos 1, eos 2), so the exported model's generate() stops at the real EOS. Not
    pad_token_id: Llama makes it the embedding's padding_idx, whose row would never train, and our
    pad is the EOS that separates documents."""
    hf_config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    return hf_config


def config_json(path: str, key: str = "model") -> Path:
    """A checkpoint's config.json on disk: a local directory's, or a hub name's fetched alone (so
    it can be read before transformers sees it)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}.path: {local} is not a Hugging Face checkpoint (no config.json)")
        return local / "config.json"
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}.path: no such directory: {local}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, "config.json"))
    except Exception as e:
        raise ConfigError(f"{key}.path: cannot read a config from {path!r}: {str(e).splitlines()[0]}") from None


def read_json_object(file: Path, key: str) -> dict:
    obj = read_json_file(file, key)
    if not isinstance(obj, dict):
        raise ConfigError(f"{key}: {file} holds a JSON {type(obj).__name__}, not an object; "
                          "re-export or re-download it")
    return obj


def check_remote_code(config: dict, cfg: ModelConfig, key: str) -> None:
    """Refuse a checkpoint that ships code of its own (`auto_map`: Auto class -> module.Class in its
    directory) unless the user trusts it: transformers would import that code while loading."""
    if "auto_map" in config and not cfg.trust_remote_code:
        raise ConfigError(f"{key}.trust_remote_code: {cfg.path} asks to run its own code (auto_map in config.json); "
                          f"set {key}.trust_remote_code=true if you trust it")


def check_checkpoint_files(cfg: ModelConfig, key: str = "model") -> None:
    """Cheap checks of a local checkpoint's files, reading headers only: a truncated download or
    copy fails here in one line, not in a loader's traceback once the data is built. Its configs
    parse and, when the weights will be loaded, every shard an index names exists and every
    safetensors file holds the bytes its header promises. A hub name is fetched later, unchecked."""
    if not cfg.path or not Path(cfg.path).expanduser().is_dir():
        return
    root = Path(cfg.path).expanduser()
    for name in ("config.json", "generation_config.json"):
        if (root / name).is_file():
            read_json_object(root / name, f"{key}.path")
    if cfg.init != "pretrained":
        return  # only the architecture is used; no weight file is read
    for index in sorted(root.glob("*.index.json")):
        check_shard_index(index, key)
    for file in sorted(root.glob("*.safetensors")):
        check_safetensors_file(file, key)


def check_shard_index(index: Path, key: str) -> None:
    weight_map = read_json_object(index, f"{key}.path").get("weight_map")
    if not isinstance(weight_map, dict):
        raise _bad_file(index, key, "has no weight_map")
    missing = sorted({str(shard) for shard in weight_map.values() if not (index.parent / str(shard)).is_file()})
    if missing:
        raise _bad_file(index, key, f"names {len(missing)} shard(s) that are missing "
                                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")


def check_safetensors_file(file: Path, key: str) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header giving each
    tensor's [begin, end) byte offsets in the data that follows, then that data: the header must
    parse and the file must be long enough for every tensor."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(file, key, f"is truncated ({size:,} of at least 8 bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > SAFETENSORS_MAX_HEADER:
                raise _bad_file(file, key, f"is not a safetensors file (a header of {header_len:,} bytes)")
            if 8 + header_len > size:
                raise _bad_file(file, key, f"is truncated ({size:,} of at least {8 + header_len:,} bytes)")
            raw = f.read(header_len)
    except OSError as e:  # a link to a deleted blob (a pruned hub cache), no read permission
        raise _bad_file(file, key, f"cannot be read ({e.strerror})") from None
    try:
        data_end = _tensor_data_end(json.loads(raw))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError among them
        raise _bad_file(file, key, f"is not a safetensors file ({e})") from None
    if size < 8 + header_len + data_end:
        raise _bad_file(file, key, f"is truncated ({size:,} of {8 + header_len + data_end:,} bytes)")


def _tensor_data_end(header) -> int:
    """Where the last tensor's bytes end, counted from the end of the header."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r} has no [begin, end] data_offsets")
        ends.append(offsets[1])
    return max(ends, default=0)


def _bad_file(file: Path, key: str, what: str) -> ConfigError:
    return ConfigError(f"{key}.path: {file} {what}; re-export or re-download it")


def local_checkpoint(path: str, key: str = "model") -> str:
    """A local directory as is; a hub name is fetched into the Hugging Face cache (weights are
    then read, and hashed, from disk)."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    try:
        # *.py: a checkpoint's own code (auto_map); fetching it runs nothing, and check_remote_code
        # decides whether it may be imported.
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
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

    # A config naming code of its own (auto_map) was only resolved with trust_remote_code=true;
    # its model class is that code. Passed explicitly: left unset, transformers asks on a terminal.
    trusted = bool(getattr(hf_config, "auto_map", None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trusted)
    return sum(p.numel() for p in model.parameters())


def choose_attn_implementation(requested: str = "auto") -> Optional[str]:
    """What to ask transformers for. None leaves the choice to transformers: SDPA where the family
    supports it, eager attention otherwise (Gemma 2, whose attention logit soft-cap SDPA cannot
    apply)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def causal_lm_class(hf_config):
    """The transformers class AutoModelForCausalLM makes for this config (its module imported)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]


def why_not_tensor_by_tensor(path: str, hf_config) -> Optional[str]:
    """Why the checkpoint at `path` cannot be loaded one tensor at a time by its tensor names (a
    reason), or None if it can: every tensor in its safetensors files is a parameter or persistent
    buffer of the model, under the same name, in a dtype torch reads."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(hf_config, "auto_map", None):
        return "its model is code of its own"
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return f"transformers has no causal LM for {hf_config.model_type!r}"
    files = model_safetensors(path)
    if not files:
        return "its weights are not safetensors files"
    headers = {name: entry for file in files for name, entry in safetensors_header(file)[0].items()}
    odd = sorted({entry.get("dtype") for entry in headers.values()} - set(SAFETENSORS_DTYPES))
    if odd:
        return f"it holds tensors of dtype {odd[0]}"
    with torch.device("meta"):
        expected = set(causal_lm_class(hf_config)._from_config(hf_config).state_dict())
    unknown = sorted(set(headers) - expected)
    if unknown:
        return f"{len(unknown)} tensor name(s) are not the model's, e.g. {unknown[0]!r}"
    return None


SAFETENSORS_INDEX = "model.safetensors.index.json"


def model_safetensors(path: str) -> list:
    """The model's safetensors files: those model.safetensors.index.json names, else
    model.safetensors, else every *.safetensors (other files beside them, a Trainer's
    training_args.bin or a repository's consolidated.safetensors, are not the model's)."""
    root = Path(path)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        return sorted({root / name for name in read_json_object(index, "model.path")["weight_map"].values()})
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    return sorted(root.glob("*.safetensors"))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(file: Path):
    """({tensor name: {dtype, shape, data_offsets}}, where the data starts) of a safetensors file."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def checkpoint_tensors(path: str):
    """(name, read) for every tensor of a checkpoint's safetensors files; read() returns that one
    tensor. Plain reads, not a memory map: the mapped pages of a file read through would count
    in the process's resident memory until it is closed, that is a whole shard at a time."""
    for file in model_safetensors(path):
        header, data_start = safetensors_header(file)
        with open(file, "rb") as f:
            for name, entry in header.items():
                yield name, (lambda f=f, entry=entry: _read_tensor(f, entry, data_start))


def _read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    f.seek(data_start + begin)
    data = bytearray(end - begin)
    f.readinto(data)
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if not data:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def attach_generation_config(model, path: str) -> None:
    """The checkpoint's generation_config.json, as from_pretrained would attach it."""
    from transformers import GenerationConfig

    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def build_model(cfg: ModelConfig, hf_config, seed: int, dtype: torch.dtype = torch.float32):
    """A causal LM in `dtype`: loaded from `cfg.path`, or freshly initialised from `seed` (a
    preset, or `cfg.init=random` with the checkpoint's architecture)."""
    from transformers import AutoModelForCausalLM

    attn = choose_attn_implementation(cfg.attn_implementation)
    if cfg.path and cfg.init == "pretrained":
        path = Path(cfg.path).expanduser()
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else cfg.path, dtype=dtype,
                                                     attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=cfg.trust_remote_code)
    log.debug("attention implementation: %s", model.config._attn_implementation)
    return model
