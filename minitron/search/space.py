"""The candidate shapes: every combination of the axis values in `search.space` that the existing
prune checks accept (GQA-legal heads, a shape transformers can save), and a spread subset of them
when more meet the budgets than the search can afford to rank.

Reads configs only: a 70B teacher's space is listed in seconds from its config.json.
"""
import dataclasses
import math
from itertools import product
from typing import List, Sequence

from minitron.config import AxisRange, ConfigError, PruneExportConfig, SearchSpaceConfig
from minitron.models.adapters import FamilyAdapter
from minitron.prune.shape import Shape, check_exportable, resolve_target

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads")
MOE_AXES = ("num_layers", "hidden_size", "num_experts", "moe_ffn_hidden_size", "num_attention_heads",
            "num_key_value_heads")


def axes_of(teacher: Shape) -> tuple:
    """The searched axes: a mixture of experts has experts and their width in place of the FFN."""
    return MOE_AXES if teacher.num_experts is not None else AXES


def axis_values(axis: AxisRange, teacher_value: int, key: str) -> List[int]:
    """Sorted values of one axis; a ConfigError naming `key` when they are empty or impossible."""
    if axis.choices is not None:
        values = sorted(set(axis.choices))
        bad = [v for v in values if not 1 <= v <= teacher_value]
        if bad:
            raise ConfigError(f"{key}.choices: {bad} outside 1..{teacher_value} (the teacher's)")
    else:
        if axis.step < 1:
            raise ConfigError(f"{key}.step: must be at least 1, got {axis.step}")
        if axis.min is None and not 0 < axis.min_ratio <= 1:
            raise ConfigError(f"{key}.min_ratio: must be in (0, 1], got {axis.min_ratio}")
        low = axis.min if axis.min is not None else math.ceil(axis.min_ratio * teacher_value - 1e-9)
        low = max(low, 1)
        first = math.ceil(low / axis.step) * axis.step
        values = sorted({*range(first, teacher_value + 1, axis.step), teacher_value} if low <= teacher_value else set())
    if not values:
        raise ConfigError(f"{key}: the range holds no value (the teacher has {teacher_value}); "
                          "widen it or give choices")
    return values


def enumerate_shapes(teacher: Shape, space: SearchSpaceConfig, teacher_config,
                     adapter: FamilyAdapter) -> List[Shape]:
    """Every legal, saveable shape of the space, largest axes first."""
    values = {name: axis_values(getattr(space, name), getattr(teacher, name), f"search.space.{name}")
              for name in axes_of(teacher)}
    # An MHA teacher whose KV axis is left alone stays MHA (KV heads follow the query heads), as
    # in minitron-prune.
    follow_heads = (teacher.num_key_value_heads == teacher.num_attention_heads
                    and values["num_key_value_heads"] == [teacher.num_key_value_heads])
    # Heads and KV heads are checked as a pair (GQA legality depends on nothing else), then with
    # each hidden size (transformers' save checks concern widths and heads; the FFN width and the
    # depth never make a config unsaveable), and only then crossed with the other two axes: a
    # 70B teacher's space is millions of shapes but a few thousand checks.
    heads_kv = []
    for heads, kv in product(reversed(values["num_attention_heads"]), reversed(values["num_key_value_heads"])):
        try:
            target = resolve_target(teacher, PruneExportConfig(
                num_attention_heads=heads, num_key_value_heads=None if follow_heads else kv))
        except ConfigError:  # heads not a multiple of the KV heads, or more per group than the teacher
            continue
        heads_kv.append((target.num_attention_heads, target.num_key_value_heads))
    heads_kv = list(dict.fromkeys(heads_kv))  # KV heads that follow the query heads repeat pairs
    if not heads_kv:
        raise ConfigError(f"search.space.num_attention_heads: no value {values['num_attention_heads']} forms whole "
                          f"GQA groups with KV heads {values['num_key_value_heads']} (the teacher has "
                          f"{teacher.num_attention_heads} heads in {teacher.num_key_value_heads} groups)")
    widths, refusal = [], ""
    for hidden, (heads, kv) in product(reversed(values["hidden_size"]), heads_kv):
        try:
            check_exportable(teacher_config, adapter, dataclasses.replace(
                teacher, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv))
            widths.append((hidden, heads, kv))
        except ConfigError as e:
            refusal = str(e).split(": ", 1)[1]  # without its prune.export.* key
    if not widths:
        raise ConfigError(f"search.space.hidden_size: no shape of the space can be saved by transformers "
                          f"(hidden {values['hidden_size']} with heads {values['num_attention_heads']}; "
                          f"the last refusal: {refusal})")
    if teacher.num_experts is None:
        mlps = [{"ffn_hidden_size": ffn} for ffn in reversed(values["ffn_hidden_size"])]
    else:
        mlps = [{"num_experts": experts, "moe_ffn_hidden_size": width} for experts, width in
                product(reversed(values["num_experts"]), reversed(values["moe_ffn_hidden_size"]))]
    return [dataclasses.replace(teacher, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                num_key_value_heads=kv, **mlp)
            for layers, (hidden, heads, kv), mlp in product(reversed(values["num_layers"]), widths, mlps)]


def shape_name(shape: Shape) -> str:
    """A directory name for the candidate: layers, hidden, ffn (or experts and their width), query
    heads, KV heads."""
    mlp = (f"F{shape.ffn_hidden_size}" if shape.num_experts is None
           else f"E{shape.num_experts}-M{shape.moe_ffn_hidden_size}")
    return f"L{shape.num_layers}-H{shape.hidden_size}-{mlp}-A{shape.num_attention_heads}-K{shape.num_key_value_heads}"


def spread(shapes: Sequence[Shape], teacher: Shape, count: int) -> List[Shape]:
    """`count` shapes that cover the space: greedy farthest-point sampling over each axis as a
    fraction of the teacher's, starting from the first (the caller's largest), ties to the
    earlier. Deterministic, and blind to any score, so every multirun job picks the same set."""
    if len(shapes) <= count:
        return list(shapes)
    points = [[getattr(s, a) / getattr(teacher, a) for a in axes_of(teacher)] for s in shapes]

    def dist(i, j):
        return math.dist(points[i], points[j])

    chosen = [0]
    nearest = [dist(0, j) for j in range(len(shapes))]
    while len(chosen) < count:
        far = max(range(len(shapes)), key=lambda j: (nearest[j], -j))
        chosen.append(far)
        nearest = [min(nearest[j], dist(far, j)) for j in range(len(shapes))]
    return [shapes[i] for i in sorted(chosen)]
