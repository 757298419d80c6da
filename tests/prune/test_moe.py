"""Mixtures of experts (Mixtral, Qwen3-MoE): pruning experts and each expert's neurons is exact
against the teacher with the dropped experts masked out of its router (their logits at minus
infinity) and the dropped neurons zeroed; expert importance reads router-weighted activations;
dry runs report total and active parameters (Mixtral 8x7B's published 46.7B / 12.9B)."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import compose_job
from minitron.config import ConfigError, DepthConfig, PruneExportConfig
from minitron.distributed.gang import LocalGang
from minitron.models.adapters import adapter_for
from minitron.models.build import count_params, head_dim_of
from minitron.models.weights import model_weights
from minitron.prune.importance import collect_activation_stats, scores_from_stats
from minitron.prune.job import run_prune_job
from minitron.prune.select import select_kept
from minitron.prune.shape import resolve_target, student_config, teacher_shape
from minitron.prune.slicing import prune_model
from minitron.search.sizing import Sizer
from random_models import MOE_FAMILIES, random_model
from test_slicing import hidden_masked_reference

INPUT = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


class Skipped(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def prune(teacher, export: PruneExportConfig, seed: int = 1):
    adapter = adapter_for(teacher.config)
    shape = teacher_shape(teacher.config)
    target = resolve_target(shape, export)
    c = teacher.config
    experts, width = shape.num_experts, shape.moe_ffn_hidden_size
    fake_scores = {"heads": torch.rand(c.num_hidden_layers, c.num_attention_heads),
                   "experts": torch.rand(c.num_hidden_layers, experts),
                   "moe": torch.rand(c.num_hidden_layers, experts, width),
                   "hidden": torch.rand(c.hidden_size),
                   "cos": torch.rand(c.num_hidden_layers + 1, c.num_hidden_layers + 1)}
    kept = select_kept(fake_scores, shape, target, DepthConfig(metric="block_importance"), seed=seed)
    student = prune_model(model_weights(teacher), adapter, kept,
                          student_config(c, adapter, target, kept.layers), attn_implementation="eager")
    return student, kept


def masked_router(router, kept_experts, renormalise: bool):
    """The router's own computation with every dropped expert's logit at minus infinity."""
    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, router.weight.shape[1]), router.weight)
        masked = torch.full_like(logits, float("-inf"))
        masked[:, kept_experts] = logits[:, kept_experts]
        probs = F.softmax(masked.float(), dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if renormalise:
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), index
    return forward


def masked_reference(teacher, kept):
    ref = copy.deepcopy(teacher)
    head_dim = head_dim_of(teacher.config)
    renormalise = getattr(teacher.config, "norm_topk_prob", True)  # Mixtral always renormalises
    layers = ref.model.layers
    with torch.no_grad():
        for j, i in enumerate(kept.layers):
            pruned_heads = torch.ones(teacher.config.num_attention_heads, dtype=torch.bool)
            pruned_heads[kept.heads[j]] = False
            layers[i].self_attn.o_proj.weight[:, pruned_heads.repeat_interleave(head_dim)] = 0
            experts = layers[i].mlp.experts
            for e, neurons in zip(kept.experts[j], kept.moe[j]):
                pruned = torch.ones(experts.down_proj.shape[-1], dtype=torch.bool)
                pruned[neurons] = False
                experts.down_proj[e][:, pruned] = 0
            layers[i].mlp.gate.forward = masked_router(layers[i].mlp.gate, kept.experts[j], renormalise)
    for i in range(len(layers)):
        if i not in kept.layers:
            layers[i] = Skipped()
    return ref


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("experts", [3, 1])  # 1: below top-2, every token goes to the one left
def test_expert_neuron_head_and_depth_pruning_equals_the_router_masked_teacher(family, experts):
    teacher = random_model(family)
    student, kept = prune(teacher, PruneExportConfig(num_experts=experts, moe_ffn_hidden_size=20,
                                                     num_attention_heads=4, num_layers=3))
    assert len(kept.experts[0]) == experts and len(kept.moe[0][0]) == 20
    assert kept.experts != [list(range(experts))] * 3  # the seed keeps experts other than the first ones
    assert student.config.num_experts_per_tok == min(2, experts)
    with torch.no_grad():
        want = masked_reference(teacher, kept)(INPUT, use_cache=False).logits
        got = student(INPUT, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_hidden_and_expert_pruning_equals_the_teacher_with_pruned_channels_held_at_zero(family):
    """As for the dense families (test_slicing): embedding channels pruned too. The reference
    computes every norm over the kept channels, so whatever the experts write into the pruned ones
    never reaches a router, an expert, attention or the output."""
    teacher = random_model(family)
    student, kept = prune(teacher, PruneExportConfig(hidden_size=40, num_experts=3, moe_ffn_hidden_size=20,
                                                     num_layers=3))
    reference = hidden_masked_reference(teacher, kept)
    with torch.no_grad():
        want = masked_reference(reference, kept)(INPUT, use_cache=False).logits
        got = student(INPUT, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_export_round_trip_and_cached_generation(tmp_path, family):
    teacher = random_model(family)
    student, _ = prune(teacher, PruneExportConfig(hidden_size=48, num_experts=2, moe_ffn_hidden_size=16,
                                                  num_layers=2))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.model.layers[0].mlp.experts.down_proj.shape == (2, 48, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT).logits, student(INPUT).logits, atol=0, rtol=0)
        cached = loaded.generate(INPUT[:1, :8], max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = loaded.generate(INPUT[:1, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


BLOCKS = np.random.default_rng(0).integers(0, 97, size=(10, 16))


def stats_of(model, **kw):
    return collect_activation_stats(model, adapter_for(model.config), BLOCKS, 4, LocalGang(), torch.device("cpu"),
                                    head_dim=head_dim_of(model.config), **kw)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_expert_and_expert_neuron_scores_are_router_weighted_activations(family):
    """In the last layer (nothing downstream moves): tripling expert 1's down_proj triples its
    score and leaves the others; tripling neuron 5's up row in expert 2 triples that neuron's
    score only. The expert scores equal the router-weighted output norms computed here from
    the model's own router and experts (seq_agg mean over tokens, batch_agg mean)."""
    model = random_model(family)
    base = scores_from_stats(stats_of(model), "l2")
    width = base["moe"].shape[-1]  # gate_up_proj rows: gate then up
    with torch.no_grad():
        model.model.layers[3].mlp.experts.down_proj[1] *= 3
        model.model.layers[3].mlp.experts.gate_up_proj[2, width + 5] *= 3
    planted = scores_from_stats(stats_of(model), "l2")
    torch.testing.assert_close(planted["experts"][3, 1], 3 * base["experts"][3, 1], rtol=1e-5, atol=0)
    torch.testing.assert_close(planted["experts"][3, [0, 3]], base["experts"][3, [0, 3]], rtol=1e-5, atol=0)
    torch.testing.assert_close(planted["moe"][3, 2, 5], 3 * base["moe"][3, 2, 5], rtol=1e-5, atol=0)
    torch.testing.assert_close(planted["moe"][3, 2, 6:], base["moe"][3, 2, 6:], rtol=1e-5, atol=0)
    torch.testing.assert_close(planted["moe"][3, 1], base["moe"][3, 1], rtol=1e-5, atol=0)

    # The reference: each token's router weight times the norm of the expert's output.
    model = random_model(family)
    block = model.model.layers[0].mlp
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault(len(captured), args[0]))
    with torch.no_grad():
        model.base_model(input_ids=torch.from_numpy(BLOCKS), use_cache=False)
        handle.remove()
        tokens = captured[0].flatten(0, 1)
        _, weights, index = block.gate(tokens)
        per_token = torch.zeros(len(tokens), block.experts.gate_up_proj.shape[0], dtype=torch.float64)
        for t in range(len(tokens)):
            for w, e in zip(weights[t], index[t]):
                gate, up = F.linear(tokens[t], block.experts.gate_up_proj[e]).chunk(2)
                out = F.linear(block.experts.act_fn(gate) * up, block.experts.down_proj[e])
                per_token[t, e] += w.double() * out.double().norm()
    want = per_token.view(10, 16, -1).mean(1).mean(0)
    got = scores_from_stats(stats_of(model), "mean")["experts"][0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
}


def test_dry_run_reports_total_and_active_parameters(tmp_path):
    teacher = tmp_path / "mixtral-8x7b"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    run_prune_job(compose_job("prune", f"model.path={teacher}", f"output_dir={tmp_path / 'out'}",
                              "prune.dry_run=true", "prune.export.num_experts=4",
                              "prune.export.moe_ffn_hidden_size=8192"), config_yaml="")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # Mixtral's published sizes: 46.7B parameters, 12.9B used per token.
    assert round(summary["teacher_params"] / 1e9, 1) == 46.7
    assert round(summary["teacher_active_params"] / 1e9, 1) == 12.9
    fields = {k: v for k, v in MIXTRAL_8X7B.items() if k not in ("model_type", "architectures")}
    student = AutoConfig.for_model("mixtral", **{**fields, "num_local_experts": 4, "intermediate_size": 8192})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student)
    experts = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                  for layer in model.model.layers)
    assert summary["student_params"] == count_params(student) == sum(p.numel() for p in model.parameters())
    assert summary["student_active_params"] == summary["student_params"] - experts + experts * 2 // 4
    assert summary["student_shape"]["num_experts"] == 4 and summary["student_config"]["num_local_experts"] == 4


@pytest.mark.parametrize("export, key", [
    (PruneExportConfig(num_experts=5), "prune.export.num_experts"),
    (PruneExportConfig(moe_ffn_hidden_size=0), "prune.export.moe_ffn_hidden_size"),
    (PruneExportConfig(ffn_hidden_size=16), "prune.export.ffn_hidden_size"),
])
def test_impossible_expert_targets_name_the_key(export, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        resolve_target(teacher_shape(random_model("mixtral").config), export)
    with pytest.raises(ConfigError, match="^prune.export.num_experts: the teacher has no experts"):
        resolve_target(teacher_shape(random_model("llama_gqa").config), PruneExportConfig(num_experts=2))


def test_qwen3_moe_with_dense_layers_is_refused_in_one_line():
    cfg = AutoConfig.for_model("qwen3_moe", mlp_only_layers=[0])
    with pytest.raises(ConfigError, match="^model.path: this qwen3_moe checkpoint cannot be pruned: dense MLP"):
        adapter_for(cfg)


def test_search_sizes_equal_the_meta_build_with_active_parameters():
    cfg = random_model("qwen3_moe").config
    adapter = adapter_for(cfg)
    target = resolve_target(teacher_shape(cfg), PruneExportConfig(num_experts=3, moe_ffn_hidden_size=24,
                                                                  hidden_size=48, num_layers=3))
    sizes = Sizer(cfg, adapter, "bf16", 16, 1).sizes(target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_config(cfg, adapter, target, [0, 1, 2]))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sizes.params == sum(p.numel() for p in model.parameters())
    assert sizes.active_params == sizes.params - experts + experts * 2 // 3


def test_search_space_of_a_moe_teacher_crosses_experts_and_expert_width_under_an_active_budget(tmp_path):
    """The search lists mixtures by experts and expert width (no dense FFN axis), sizes each
    exactly, and holds them to search.active_params; a dense teacher refuses that budget."""
    from minitron.search.job import plan_search
    from minitron.search.space import shape_name

    teacher = tmp_path / "mixtral"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({**MIXTRAL_8X7B, "num_hidden_layers": 4}))
    plan = plan_search(compose_job("search", f"model.path={teacher}", "search.active_params=1.5e9",
                                   "search.dry_run=true", "search.tolerance=0.1"))
    assert plan.listed and {s.num_experts for s, _ in plan.listed} > {8}
    assert {s.ffn_hidden_size for s, _ in plan.listed} == {0}
    for shape, sizes in plan.listed:
        assert abs(sizes.active_params - 1.5e9) <= 0.1 * 1.5e9
        assert shape_name(shape).split("-")[2:4] == [f"E{shape.num_experts}", f"M{shape.moe_ffn_hidden_size}"]
    shape, sizes = plan.listed[-1]
    student = student_config(plan.teacher_config, plan.adapter, shape, list(range(shape.num_layers)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sizes.params == sum(p.numel() for p in model.parameters())
    assert sizes.active_params == sizes.params - experts + experts * 2 // shape.num_experts

    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({**{k: v for k, v in MIXTRAL_8X7B.items()
                                                      if k not in ("num_local_experts", "num_experts_per_tok")},
                                                   "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="^search.active_params: the teacher is not a mixture of experts"):
        plan_search(compose_job("search", f"model.path={dense}", "search.active_params=4e9", "search.dry_run=true"))
