"""The search space and the budgets, from configs alone: axis values, GQA-legal and saveable
shapes, the spread subset, exact sizes equal to meta-device builds, and budget errors that name
the key and the nearest feasible budget."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import compose_job
from minitron.config import AxisRange, ConfigError, SearchConfig, SearchSpaceConfig
from minitron.models.adapters import adapter_for
from minitron.models.build import count_params
from minitron.prune.shape import student_config, teacher_shape
from minitron.search.budget import within_budgets
from minitron.search.job import plan_search, run_search_job
from minitron.search.sizing import Sizer
from minitron.search.space import axis_values, enumerate_shapes, shape_name, spread
from prune.random_models import FAMILIES
from prune.test_prune_cli import LLAMA_31_8B


def test_axis_values():
    assert axis_values(AxisRange(min_ratio=0.6, step=64), 384, "k") == [256, 320, 384]
    assert axis_values(AxisRange(min_ratio=0.8, step=1), 32, "k") == list(range(26, 33))
    assert axis_values(AxisRange(min_ratio=0.6, step=64), 1000, "k") == [640, 704, 768, 832, 896, 960, 1000]
    assert axis_values(AxisRange(min=5, step=1), 6, "k") == [5, 6]
    assert axis_values(AxisRange(choices=[3, 1, 3]), 4, "k") == [1, 3]
    with pytest.raises(ConfigError, match=r"^k.choices: \[9\] outside 1..4"):
        axis_values(AxisRange(choices=[9]), 4, "k")
    with pytest.raises(ConfigError, match="^k: the range holds no value"):
        axis_values(AxisRange(min=8, step=1), 6, "k")
    with pytest.raises(ConfigError, match="^k: the range holds no value"):
        axis_values(AxisRange(choices=[]), 6, "k")


def family_config(family, **over):
    spec = dict(FAMILIES[family])
    return AutoConfig.for_model(spec.pop("model_type"), vocab_size=97, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=4, max_position_embeddings=64, **{**spec, **over})


WIDE = SearchSpaceConfig(num_layers=AxisRange(min_ratio=0.5, step=1), hidden_size=AxisRange(min_ratio=0.5, step=16),
                         ffn_hidden_size=AxisRange(min_ratio=0.5, step=32),
                         num_attention_heads=AxisRange(min_ratio=0.5, step=1),
                         num_key_value_heads=AxisRange(min_ratio=0.5, step=1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_shape_is_legal_and_its_sizes_equal_the_meta_build(family):
    cfg = family_config(family)
    adapter = adapter_for(cfg)
    teacher = teacher_shape(cfg)
    shapes = enumerate_shapes(teacher, WIDE, cfg, adapter)
    assert teacher in shapes and len(shapes) == len(set(shapes)) > 10
    sizer = Sizer(cfg, adapter, "bf16", seq_len=32, batch_size=3)
    for shape in shapes:
        assert shape.num_attention_heads % shape.num_key_value_heads == 0
        if teacher.num_key_value_heads == teacher.num_attention_heads:
            assert shape.num_key_value_heads == shape.num_attention_heads  # MHA stays MHA
        student = student_config(cfg, adapter, shape, list(range(shape.num_layers)))
        sizes = sizer.sizes(shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(student)
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings().weight
        params = sum(p.numel() for p in model.parameters())
        assert sizes.params == params, shape
        untied = output.numel() if output is not embedding else 0
        assert sizes.non_embedding_params == params - embedding.numel() - untied
        kv = 2 * shape.num_layers * shape.num_key_value_heads * student.head_dim * 32 * 3
        assert sizes.memory_gb == pytest.approx((params + kv) * 2 / 2**30, rel=1e-12)
        matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not embedding)
        attention = 4 * shape.num_layers * shape.num_attention_heads * student.head_dim * 32
        assert sizes.flops_per_token == 2 * (matmul + (0 if untied else embedding.numel())) + attention


def test_unsaveable_and_illegal_spaces_name_the_key():
    cfg = family_config("llama_gqa")  # 8 heads in 2 KV groups, hidden 64
    adapter, teacher = adapter_for(cfg), teacher_shape(cfg)
    odd_heads = dataclasses.replace(WIDE, num_attention_heads=AxisRange(choices=[5, 7]),
                                    num_key_value_heads=AxisRange(choices=[2]))
    with pytest.raises(ConfigError, match="^search.space.num_attention_heads: no value"):
        enumerate_shapes(teacher, odd_heads, cfg, adapter)
    unsaveable = dataclasses.replace(WIDE, hidden_size=AxisRange(choices=[36, 44]),
                                     num_attention_heads=AxisRange(choices=[8]))
    with pytest.raises(ConfigError, match="^search.space.hidden_size: no shape of the space can be saved"):
        enumerate_shapes(teacher, unsaveable, cfg, adapter)
    shapes = enumerate_shapes(teacher, dataclasses.replace(WIDE, hidden_size=AxisRange(choices=[36, 48])), cfg, adapter)
    assert {s.num_attention_heads for s in shapes if s.hidden_size == 36} == {4, 6}  # not 8: 36 % 8
    assert {s.num_attention_heads for s in shapes if s.hidden_size == 48} == {4, 6, 8}
    assert all(s.hidden_size % s.num_attention_heads == 0 for s in shapes)


def test_spread_is_deterministic_and_covers_the_extremes():
    cfg = family_config("llama_gqa")
    teacher = teacher_shape(cfg)
    shapes = sorted(enumerate_shapes(teacher, WIDE, cfg, adapter_for(cfg)), key=shape_name)
    picked = spread(shapes, teacher, 6)
    assert len(picked) == 6 == len(set(picked)) and picked == spread(shapes, teacher, 6)
    assert shapes[0] in picked and spread(shapes[:4], teacher, 6) == shapes[:4]
    layers = {s.num_layers for s in picked}
    assert min(layers) == 2 and max(layers) == 4  # both ends of the depth axis


def budget_candidates():
    cfg = family_config("llama_gqa")
    adapter, teacher = adapter_for(cfg), teacher_shape(cfg)
    sizer = Sizer(cfg, adapter, "fp32", 16, 1)
    return [(s, sizer.sizes(s)) for s in enumerate_shapes(teacher, WIDE, cfg, adapter)], sizer.sizes(teacher)


def test_budgets_hold_together_within_tolerance():
    candidates, teacher = budget_candidates()
    search = SearchConfig(params=teacher.params * 0.6, memory_gb=teacher.memory_gb * 0.6, tolerance=0.1)
    kept = within_budgets(candidates, search, teacher)
    assert kept and all(abs(s.params / search.params - 1) <= 0.1 and abs(s.memory_gb / search.memory_gb - 1) <= 0.1
                        for _, s in kept)
    assert len(kept) == sum(1 for _, s in candidates if abs(s.params / search.params - 1) <= 0.1
                            and abs(s.memory_gb / search.memory_gb - 1) <= 0.1)


def test_infeasible_budgets_name_the_key_and_the_nearest_feasible_budget():
    candidates, teacher = budget_candidates()
    smallest = min(s.params for _, s in candidates)
    with pytest.raises(ConfigError, match=rf"^search.params: 10 is met by no candidate within 5%; the nearest "
                                          rf"feasible budget is {smallest}"):
        within_budgets(candidates, SearchConfig(params=10), teacher)
    with pytest.raises(ConfigError, match=rf"^search.params: 1000000000 is above the teacher's {teacher.params}; "
                                          rf"the nearest feasible budget is {teacher.params}"):
        within_budgets(candidates, SearchConfig(params=1e9), teacher)
    with pytest.raises(ConfigError, match="^search.params: set a budget"):
        within_budgets(candidates, SearchConfig(), teacher)
    with pytest.raises(ConfigError, match="^search.flops_per_token: .* together with the budgets before it"):
        within_budgets(candidates, SearchConfig(params=smallest, flops_per_token=teacher.flops_per_token), teacher)


def test_llama_31_8b_dry_run_lists_the_published_minitron_width_shape(tmp_path):
    """Acceptance: hidden 3072, ffn 9216, 32 heads, 32 layers (Llama-3.1-Minitron-4B-Width) is listed
    under 4.5e9 parameters; every listed candidate is within 5%, and the sizes equal meta builds."""
    teacher = tmp_path / "llama-3.1-8b"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(LLAMA_31_8B))
    out = tmp_path / "out"
    summary = run_search_job(compose_job("search", f"model.path={teacher}", f"output_dir={out}",
                                         "search.params=4.5e9", "search.dry_run=true", "logger=none"), config_yaml="")
    listed = json.loads((out / "search.json").read_text())["candidates"]
    assert summary["num_listed"] == len(listed) > 100 and summary["num_chosen"] == 8
    assert all(abs(c["params"] / 4.5e9 - 1) <= 0.05 for c in listed)
    width = next(c for c in listed if c["name"] == "L32-H3072-F9216-A32-K8")
    assert round(width["params"] / 1e9, 2) == 4.51
    assert all(c["num_layers"] >= 26 and c["hidden_size"] >= 0.6 * 4096 and c["hidden_size"] % 64 == 0
               and c["ffn_hidden_size"] % 64 == 0 and c["num_attention_heads"] in (24, 32) for c in listed)
    assert (out / "search.csv").read_text().count("\n") == len(listed) + 1
    hf = AutoConfig.for_model(**LLAMA_31_8B)
    adapter = adapter_for(hf)
    plan = plan_search(compose_job("search", f"model.path={teacher}", "search.params=4.5e9", "search.dry_run=true"))
    # Building 8B on the meta device takes ~0.05 s: the width shape, the ranked ones and every 97th.
    sample = [c for i, c in enumerate(listed) if i % 97 == 0 or c["chosen"] or c is width]
    for c in sample:
        shape = next(s for s, _ in plan.listed if shape_name(s) == c["name"])
        assert c["params"] == count_params(student_config(hf, adapter, shape, list(range(shape.num_layers)))), c
