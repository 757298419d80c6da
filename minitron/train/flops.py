"""Model FLOPs utilisation: the FLOPs a step needs by formula, over what the accelerator could do.

Per token, a forward pass costs 2 FLOPs per parameter and a training step 6 (forward + backward);
attention adds 4 * layers * attention width * sequence length forward, 12 for training
(PaLM, arXiv 2204.02311 appendix B). Distillation trains the student and runs the teacher
forward only.
"""
from typing import Optional

import torch

from minitron.models.build import head_dim_of

# Dense peak FLOP/s per GPU from the vendors' data sheets: (bf16, tf32). Matched by substring of
# torch.cuda.get_device_name(); an unknown GPU or a CPU gives no MFU rather than a wrong one.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
}


def peak_flops(precision: str) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, tf32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def attention_width(hf_config) -> int:
    return hf_config.num_hidden_layers * hf_config.num_attention_heads * head_dim_of(hf_config)


def flops_per_token(seq_len: int, trained_params: int, trained_config, frozen_params: int = 0,
                    frozen_config=None) -> float:
    flops = 6 * trained_params + 12 * attention_width(trained_config) * seq_len
    if frozen_config is not None:
        flops += 2 * frozen_params + 4 * attention_width(frozen_config) * seq_len
    return float(flops)


def mfu(tokens_per_s: float, per_token: float, precision: str, world_size: int) -> Optional[float]:
    """Fraction of the gang's peak; None off GPU or on a GPU missing from PEAK_FLOPS."""
    peak = peak_flops(precision)
    if peak is None or not tokens_per_s == tokens_per_s:  # NaN: too few steps were timed
        return None
    return tokens_per_s * per_token / (peak * world_size)
