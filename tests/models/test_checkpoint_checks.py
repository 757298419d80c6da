"""Checkpoints that are corrupt, or that ship code of their own, are refused in the check phase with
one line naming the key to fix (exit 2), before any data or model is built; custom code runs only
with <key>.trust_remote_code=true."""
import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import compose_job, corpus_texts, run_cli, tiny_args
from minitron.config import ConfigError, ModelConfig
from minitron.data.tokenizer import train_bpe_tokenizer
from minitron.models.build import check_checkpoint_files, resolve_hf_config

VOCAB = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_dir) -> Path:
    """A tiny llama with random weights and a BPE tokenizer of the test corpus: a sound checkpoint
    that each test copies before breaking it."""
    root = tmp_path_factory.mktemp("checkpoint") / "model"
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root)
    train_bpe_tokenizer(corpus_texts(corpus_dir)[:4], VOCAB).save_pretrained(root)
    return root


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def truncate(file: Path, keep: int) -> int:
    """Cut `file` to its first `keep` bytes; returns its size before."""
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    return len(data)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# -- safetensors, shard index and JSON files, checked in process ------------------------------

def test_a_sound_checkpoint_passes(checkpoint):
    check_checkpoint_files(ModelConfig(path=str(checkpoint)))


@pytest.mark.parametrize("cut", ["tail", "header", "prefix"])
def test_truncated_safetensors_names_the_sizes(ckpt, cut):
    weights = ckpt / "model.safetensors"
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    keep = {"tail": weights.stat().st_size - 100, "header": 8 + header_len // 2, "prefix": 5}[cut]
    size = truncate(weights, keep)
    needed = {"tail": f"{size:,}", "header": f"at least {8 + header_len:,}", "prefix": "at least 8"}[cut]
    with pytest.raises(ConfigError) as e:
        check_checkpoint_files(ModelConfig(path=str(ckpt)), "teacher")
    assert str(e.value) == (f"teacher.path: {weights} is truncated ({keep:,} of {needed} bytes); "
                            "re-export or re-download it")


def test_garbage_safetensors_is_not_a_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"<html>Not Found</html>" * 10)
    with pytest.raises(ConfigError, match=r"^model.path: .*model.safetensors is not a safetensors file"):
        check_checkpoint_files(ModelConfig(path=str(ckpt)))
    # A header that parses but does not describe tensors.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ConfigError, match=r"is not a safetensors file \(tensor 'w' has no \[begin, end\]"):
        check_checkpoint_files(ModelConfig(path=str(ckpt)))


def test_weights_that_are_not_loaded_are_not_checked(ckpt):
    """init=random builds the architecture only; the weight files are never read."""
    truncate(ckpt / "model.safetensors", 100)
    check_checkpoint_files(ModelConfig(path=str(ckpt), init="random"))


def test_shard_index_names_missing_shards(ckpt):
    weights = ckpt / "model.safetensors"
    weights.rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"^model.path: .*index.json names 1 shard\(s\) that are missing "
                                          r"\(model-00002-of-00002.safetensors\)"):
        check_checkpoint_files(ModelConfig(path=str(ckpt)))
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001')
    with pytest.raises(ConfigError, match=r"^model.path: .*index.json is not valid JSON"):
        check_checkpoint_files(ModelConfig(path=str(ckpt)))


@pytest.mark.parametrize("text,message", [('{"model_type": "llama", "hidden', "is not valid JSON"),
                                          ("[1, 2]", "holds a JSON list, not an object"),
                                          ("\udcff", "is not valid JSON")])
def test_bad_config_json_is_one_line_before_transformers(ckpt, text, message):
    (ckpt / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as e:
        resolve_hf_config(ModelConfig(path=str(ckpt)), 0, key="student")
    assert str(e.value).startswith(f"student.path: {ckpt / 'config.json'} {message}")
    assert "\n" not in str(e.value)


# -- the check phases of prune and distill --------------------------------------------------

def test_prune_check_refuses_truncated_weights(ckpt, corpus_dir, tmp_path):
    from minitron.prune.job import check_prune_inputs

    truncate(ckpt / "model.safetensors", 1000)
    cfg = compose_job("prune", f"model.path={ckpt}", f"data.path={corpus_dir}", "data.seq_len=64",
                      "prune.export.ffn_hidden_size=32", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=r"^model.path: .*model.safetensors is truncated \(1,000 of "):
        check_prune_inputs(cfg)


def test_prune_check_refuses_a_garbage_tokenizer(ckpt, corpus_dir, tmp_path):
    from minitron.prune.job import check_prune_inputs

    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"a"')
    cfg = compose_job("prune", f"model.path={ckpt}", f"data.path={corpus_dir}", "data.seq_len=64",
                      "prune.export.ffn_hidden_size=32", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*tokenizer.json is not valid JSON"):
        check_prune_inputs(cfg)


def test_eval_check_refuses_truncated_weights(ckpt, corpus_dir, tmp_path):
    from minitron.eval.job import check_eval_inputs

    truncate(ckpt / "model.safetensors", 1000)
    cfg = compose_job("eval", f"model.path={ckpt}", f"data.path={corpus_dir}", "data.seq_len=64",
                      f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=r"^model.path: .*model.safetensors is truncated \(1,000 of "):
        check_eval_inputs(cfg)


@pytest.mark.parametrize("broken", ["teacher", "student"])
def test_distill_check_names_the_broken_checkpoint(checkpoint, ckpt, corpus_dir, tmp_path, broken):
    from minitron.distill.job import check_distill_inputs

    truncate(ckpt / "model.safetensors", 1000)
    paths = {"teacher": checkpoint, "student": checkpoint, broken: ckpt}
    cfg = compose_job("distill", f"teacher.path={paths['teacher']}", f"student.path={paths['student']}",
                      f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=rf"^{broken}.path: .*model.safetensors is truncated"):
        check_distill_inputs(cfg, world_size=1)


def test_distill_check_refuses_a_garbage_tokenizer(checkpoint, ckpt, corpus_dir, tmp_path):
    from minitron.distill.job import check_distill_inputs

    (ckpt / "tokenizer_config.json").write_text("not json")
    cfg = compose_job("distill", f"teacher.path={checkpoint}", f"student.path={ckpt}",
                      f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match=r"^student.path: .*tokenizer_config.json is not valid JSON"):
        check_distill_inputs(cfg, world_size=1)


# -- minitron-train end to end ----------------------------------------------------------------

def break_weights(root: Path) -> str:
    truncate(root / "model.safetensors", 4096)
    return r"error: model.path: .*model.safetensors is truncated \(4,096 of [\d,]+ bytes\)"


# One through a real interpreter end to end; the bad-input table (tests/cli) runs the rest in-process.
@pytest.mark.parametrize("breaks", [break_weights])
def test_train_refuses_a_corrupt_checkpoint_in_one_line(ckpt, corpus_dir, tmp_path, breaks):
    pattern = breaks(ckpt)
    out = tmp_path / "out"
    proc = run_cli(tiny_args(corpus_dir, out, f"model.path={ckpt}"), check=False, timeout=300)
    assert re.match(pattern, one_error_line(proc))
    assert not (out / "summary.json").exists() and not (out / "model").exists()


# -- remote code ------------------------------------------------------------------------------

def add_custom_code(root: Path, marker: Path) -> None:
    """Make `root` a checkpoint of a model type transformers does not know, whose classes (small
    subclasses of Llama's) live in the checkpoint itself; each module notes in `marker` that it ran."""
    (root / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n"
        f"with open({str(marker)!r}, 'a') as f:\n    f.write('configuration\\n')\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'minitron_custom'\n")
    (root / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n"
        f"with open({str(marker)!r}, 'a') as f:\n    f.write('modeling\\n')\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((root / "config.json").read_text())
    config.update(model_type="minitron_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (root / "config.json").write_text(json.dumps(config))


def test_custom_code_is_refused_before_it_is_imported(ckpt, tmp_path):
    marker = tmp_path / "ran"
    add_custom_code(ckpt, marker)
    with pytest.raises(ConfigError) as e:
        resolve_hf_config(ModelConfig(path=str(ckpt)), 0, key="teacher")
    assert str(e.value) == (f"teacher.trust_remote_code: {ckpt} asks to run its own code (auto_map in config.json); "
                            "set teacher.trust_remote_code=true if you trust it")
    assert not marker.exists()


def test_train_runs_custom_code_only_when_trusted(ckpt, corpus_dir, tmp_path):
    marker = tmp_path / "ran"
    add_custom_code(ckpt, marker)
    # transformers copies trusted code into its modules cache before importing it: keep that out of $HOME.
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = tiny_args(corpus_dir, tmp_path / "out", f"model.path={ckpt}", "train.max_steps=2")

    refused = run_cli(args, check=False, timeout=300, env=env)
    assert one_error_line(refused).startswith("error: model.trust_remote_code: ")
    assert not marker.exists() and not (tmp_path / "modules").exists()

    run_cli([*args, "model.trust_remote_code=true"], timeout=300, env=env)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert set(marker.read_text().split()) == {"configuration", "modeling"}
    exported = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert exported["model_type"] == "minitron_custom" and "auto_map" in exported
