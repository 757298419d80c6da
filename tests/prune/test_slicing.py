"""Slicing is exact: the pruned student computes what the teacher computes with the pruned
neurons and heads zeroed and the pruned layers skipped; the export round-trips through
`from_pretrained`; generation with a KV cache works after depth pruning."""
import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from minitron.config import ConfigError, DepthConfig, PruneExportConfig
from minitron.models.adapters import adapter_for
from minitron.prune.select import select_kept
from minitron.models.build import head_dim_of
from minitron.prune.shape import resolve_target, student_config, teacher_shape
from minitron.models.weights import SafetensorsWeights, model_weights
from minitron.prune.slicing import prune_model
from random_models import FAMILIES, random_model

class Skipped(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def masked_reference(teacher, kept, head_dim):
    """The teacher with pruned neurons' down_proj columns and pruned heads' o_proj columns zeroed
    and pruned layers replaced by the identity."""
    ref = copy.deepcopy(teacher)
    layers = ref.model.layers
    with torch.no_grad():
        for j, i in enumerate(kept.layers):
            mlp_mask = torch.ones(teacher.config.intermediate_size, dtype=torch.bool)
            mlp_mask[kept.mlp[j]] = False
            layers[i].mlp.down_proj.weight[:, mlp_mask] = 0
            head_mask = torch.ones(teacher.config.num_attention_heads, dtype=torch.bool)
            head_mask[kept.heads[j]] = False
            layers[i].self_attn.o_proj.weight[:, head_mask.repeat_interleave(head_dim)] = 0
    for i in range(len(layers)):
        if i not in kept.layers:
            layers[i] = Skipped()
    return ref


def prune(teacher, export: PruneExportConfig, seed: int = 1, contiguous=False):
    adapter = adapter_for(teacher.config)
    shape = teacher_shape(teacher.config)
    target = resolve_target(shape, export)
    cfg = teacher.config
    fake_scores = {"heads": torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads),
                   "mlp": torch.rand(cfg.num_hidden_layers, cfg.intermediate_size),
                   "hidden": torch.rand(cfg.hidden_size),
                   "cos": torch.rand(cfg.num_hidden_layers + 1, cfg.num_hidden_layers + 1)}
    kept = select_kept(fake_scores, shape, target, DepthConfig(metric="block_importance", contiguous=contiguous),
                       seed=seed)
    student = prune_model(model_weights(teacher), adapter, kept, student_config(teacher.config, adapter, target, kept.layers),
                          attn_implementation="eager")
    return student, kept


INPUT = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlp_heads_and_depth_pruning_equals_masked_teacher(family):
    teacher = random_model(family)
    heads = teacher.config.num_attention_heads // 2
    export = PruneExportConfig(ffn_hidden_size=40, num_attention_heads=heads, num_layers=2)
    student, kept = prune(teacher, export)
    assert kept.layers != [0, 1]  # the seed drops inner layers, so renumbering is exercised
    reference = masked_reference(teacher, kept, head_dim_of(teacher.config))
    with torch.no_grad():
        want = reference(INPUT, use_cache=False).logits
        got = student(INPUT, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 40
    assert student.config.head_dim == head_dim_of(teacher.config)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "phi3"])  # phi3: k and v inside the fused qkv_proj
def test_pruning_whole_kv_groups_equals_masked_teacher(family):
    teacher = random_model(family)
    student, kept = prune(teacher, PruneExportConfig(num_attention_heads=4, num_key_value_heads=1))
    per_group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    for heads, groups in zip(kept.heads, kept.kv_heads):
        assert len(groups) == 1 and {h // per_group for h in heads} == set(groups)
    reference = masked_reference(teacher, kept, head_dim_of(teacher.config))
    with torch.no_grad():
        torch.testing.assert_close(student(INPUT).logits, reference(INPUT).logits, atol=1e-5, rtol=0)


def test_qwen2_per_layer_attention_types_follow_kept_layers():
    teacher = random_model("qwen2")
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student, kept = prune(teacher, PruneExportConfig(num_layers=2), seed=3)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept.layers]
    assert student.config.max_window_layers == sum(i < 2 for i in kept.layers)


class KeptChannels(nn.Module):
    """A norm over the residual stream that sees only the kept channels: the norm, with its
    weights sliced, applied to them, and zeros in the pruned channels."""

    def __init__(self, norm: nn.Module, kept: torch.Tensor):
        super().__init__()
        self.norm, self.kept = copy.deepcopy(norm), kept
        with torch.no_grad():
            for name, p in list(self.norm.named_parameters()):
                setattr(self.norm, name, nn.Parameter(p[kept]))
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.normalized_shape = (len(kept),)

    def forward(self, x):
        return torch.zeros_like(x).index_copy(-1, self.kept, self.norm(x[..., self.kept]))


def hidden_masked_reference(teacher, kept):
    """The teacher with the pruned embedding channels held at zero all the way through: zero
    embedding columns, zero output rows of every projection that writes the residual stream, and
    every hidden-width norm computed over the kept channels only."""
    ref = copy.deepcopy(teacher)
    hidden = ref.config.hidden_size
    pruned = torch.ones(hidden, dtype=torch.bool)
    pruned[kept.hidden] = False
    kept_idx = torch.tensor(kept.hidden)
    with torch.no_grad():
        ref.get_input_embeddings().weight[:, pruned] = 0
        for name, module in list(ref.named_modules()):
            if name.endswith(("o_proj", "down_proj")):
                module.weight[pruned] = 0
                if module.bias is not None:
                    module.bias[pruned] = 0
            elif "norm" in name.rsplit(".", 1)[-1] and not name.endswith(("q_norm", "k_norm")):
                assert module.weight.shape == (hidden,), name
                parent, _, child = name.rpartition(".")
                setattr(ref.get_submodule(parent), child, KeptChannels(module, kept_idx))
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_pruning_equals_teacher_with_pruned_channels_held_at_zero(family):
    teacher = random_model(family)
    student, kept = prune(teacher, PruneExportConfig(hidden_size=40, ffn_hidden_size=56, num_layers=3))
    assert student.config.hidden_size == 40
    reference = masked_reference(hidden_masked_reference(teacher, kept), kept, head_dim_of(teacher.config))
    with torch.no_grad():
        want = reference(INPUT, use_cache=False).logits
        got = student(INPUT, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama_tied_bias", "qwen2", "nemotron", "gemma2", "gemma3_text", "phi3"])
def test_export_round_trip_and_cached_generation(tmp_path, family):
    teacher = random_model(family)
    export = PruneExportConfig(hidden_size=48, ffn_hidden_size=40, num_attention_heads=4, num_layers=2)
    student, kept = prune(teacher, export, contiguous=True)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.hidden_size == 48 and loaded.config.num_hidden_layers == 2
    if teacher.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT).logits, student(INPUT).logits, atol=0, rtol=0)
        # Greedy decoding with the KV cache must match recomputing the whole prefix every step:
        # a layer_idx that was not renumbered breaks the cache.
        cached = loaded.generate(INPUT[:1, :8], max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = loaded.generate(INPUT[:1, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape[1] == 20
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("export, key", [
    (PruneExportConfig(hidden_size=65), "prune.export.hidden_size"),
    (PruneExportConfig(num_layers=0), "prune.export.num_layers"),
    (PruneExportConfig(num_attention_heads=5), "prune.export.num_attention_heads"),
    (PruneExportConfig(num_key_value_heads=3), "prune.export.num_key_value_heads"),
    (PruneExportConfig(num_attention_heads=8, num_key_value_heads=1), "prune.export.num_attention_heads"),
])
def test_impossible_targets_name_the_key(export, key):
    shape = teacher_shape(random_model("llama_gqa").config)
    with pytest.raises(ConfigError, match=f"^{key}:"):
        resolve_target(shape, export)


def test_unset_targets_keep_the_teacher_and_mha_stays_mha():
    gqa = teacher_shape(random_model("llama_gqa").config)
    assert resolve_target(gqa, PruneExportConfig()) == gqa
    assert resolve_target(gqa, PruneExportConfig(num_attention_heads=6)).num_key_value_heads == 2
    mha = teacher_shape(random_model("llama_mha").config)
    assert resolve_target(mha, PruneExportConfig(num_attention_heads=2)).num_key_value_heads == 2


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])  # no adapter; an encoder-decoder
def test_model_type_without_adapter_lists_the_supported_ones(model_type):
    supported = "gemma2, gemma3_text, llama, mistral, mixtral, nemotron, phi3, qwen2, qwen3, qwen3_moe"
    with pytest.raises(ConfigError, match=f"^model.path: model type '{model_type}' has no pruning adapter; "
                                          f"supported: {supported}$"):
        adapter_for(AutoConfig.for_model(model_type))


@pytest.mark.parametrize("family", ["llama_tied_bias", "qwen2"])
def test_building_from_the_checkpoint_files_equals_building_from_the_model(tmp_path, family):
    teacher = random_model(family)
    teacher.save_pretrained(tmp_path)
    adapter = adapter_for(teacher.config)
    shape = teacher_shape(teacher.config)
    target = resolve_target(shape, PruneExportConfig(hidden_size=40, ffn_hidden_size=50, num_layers=3))
    _, kept = prune(teacher, PruneExportConfig(hidden_size=40, ffn_hidden_size=50, num_layers=3))
    cfg = student_config(teacher.config, adapter, target, kept.layers)
    from_model = prune_model(model_weights(teacher), adapter, kept, cfg).state_dict()
    from_files = prune_model(SafetensorsWeights(str(tmp_path)), adapter, kept, cfg)
    assert from_files.state_dict().keys() == from_model.keys()
    for name, tensor in from_files.state_dict().items():
        assert torch.equal(tensor, from_model[name]), name
    for name, buf in from_files.named_buffers():
        assert torch.equal(buf, dict(teacher.named_buffers())[name]), name
