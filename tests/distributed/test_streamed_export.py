"""The streamed export (rank 0 writes safetensors shards one parameter at a time) writes what
save_pretrained writes: the same tensor names (a tied lm_head once), the same values, shards of at
most export.max_shard_size with an index past one file, and a directory from_pretrained loads."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from minitron.distributed.sharded import export_configs, export_streamed


def tiny_llama(tied: bool):
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def tensors(directory) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000])
def test_streamed_export_writes_what_save_pretrained_writes(tmp_path, tied, max_shard_bytes):
    model, twin = tiny_llama(tied), tiny_llama(tied)  # save_pretrained edits the config it saves
    reference, streamed = tmp_path / "reference", tmp_path / "streamed"
    model.save_pretrained(reference, max_shard_size=max_shard_bytes)
    streamed.mkdir()
    export_configs(twin, streamed)
    export_streamed(twin, streamed, max_shard_bytes)

    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((reference / name).read_text()), name

    want, got = tensors(reference), tensors(streamed)
    assert sorted(got) == sorted(want)
    assert ("lm_head.weight" in got) == (not tied)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    files = sorted(streamed.glob("*.safetensors"))
    if max_shard_bytes == 10**9:
        assert [f.name for f in files] == ["model.safetensors"] and not (streamed / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {f.name for f in files}
        assert sorted(index["weight_map"]) == sorted(got)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
        for file in files:  # a shard over the limit holds one tensor that is over it alone
            with safe_open(str(file), "pt") as f:
                sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
            assert sum(sizes) <= max_shard_bytes or len(sizes) == 1, (file.name, sizes)
    loaded = AutoModelForCausalLM.from_pretrained(streamed)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
