import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from minitron.cli.common import conf_dir
from minitron.config import ConfigError, ModelConfig, register_schemas
from minitron.models.build import build_model, choose_attn_implementation, count_params, resolve_hf_config


def preset(name: str) -> ModelConfig:
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    return OmegaConf.to_object(cfg).model


@pytest.mark.parametrize("tied", [False, True])
def test_meta_count_equals_materialised_count(tied):
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_preset_sizes():
    assert count_params(resolve_hf_config(preset("tiny"), vocab_size=4096)) < 1_000_000
    assert 4e6 <= count_params(resolve_hf_config(preset("small"), vocab_size=4096)) <= 8e6


def test_attention_is_sdpa_without_a_gpu_and_eager_where_the_family_has_no_sdpa():
    assert not torch.cuda.is_available()
    assert choose_attn_implementation("eager") == "eager"
    for family, want in (("llama", "sdpa"), ("gemma2", "eager")):
        cfg = dataclasses.replace(preset("tiny"), family=family)
        hf_config = resolve_hf_config(cfg, vocab_size=320)
        assert build_model(cfg, hf_config, seed=1).config._attn_implementation == want


def test_local_checkpoint_round_trip(tmp_path):
    cfg = preset("tiny")
    model = build_model(cfg, resolve_hf_config(cfg, vocab_size=320), seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded_cfg = ModelConfig(path=str(tmp_path / "ckpt"))
    loaded = build_model(loaded_cfg, resolve_hf_config(loaded_cfg, 0), seed=99)
    x = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_bad_model_inputs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="^model.path: .* not a Hugging Face checkpoint"):
        resolve_hf_config(ModelConfig(path=str(tmp_path)), 100)
    with pytest.raises(ConfigError, match="^model.path: no such directory"):
        resolve_hf_config(ModelConfig(path=str(tmp_path / "nope")), 100)
    with pytest.raises(ConfigError, match="^model.num_key_value_heads"):
        resolve_hf_config(ModelConfig(num_attention_heads=6, num_key_value_heads=4), 100)
