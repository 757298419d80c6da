import math

import pytest
import torch

from minitron.config import TrainConfig
from minitron.train.schedule import build_optimizer, lr_multiplier


def test_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_no_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, sched = build_optimizer(model, TrainConfig(lr=1.0, warmup_steps=4, max_steps=8, weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0 and len(plain["params"]) == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
