"""Distillation losses as pure functions of tensors: per-token logit divergences, cross-entropy,
and intermediate hidden-state losses. No modules, no parallelism: the fused chunked path
(fused.py) and the tests call exactly these.

Logit losses return one value per token ([N]); callers average. Divergences are between the
teacher's distribution p and the student's q at each position (arXiv 2407.14679 section 3 found
forward KL(p || q) at temperature 1, without a cross-entropy term, best).
"""
import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 logits are upcast (softmax over 100k+ entries needs it); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from finite log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q; beta = 0.5
    is the Jensen-Shannon divergence (the GKD family, arXiv 2306.13649)."""
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), dim=0)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


def logit_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     divergence: str = "forward_kl", temperature: float = 1.0, top_k: int = 0,
                     beta: float = 0.5, scale_by_t2: bool = False) -> torch.Tensor:
    """[N] divergence between teacher and student next-token distributions, from [N, V] logits.

    top_k > 0 keeps only the teacher's k most likely tokens: both distributions are renormalised
    over that support (so reverse KL and JSD stay finite). scale_by_t2 multiplies by T^2, which
    keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    s = _at_least_fp32(student_logits) / temperature
    t = _at_least_fp32(teacher_logits) / temperature
    if top_k:
        idx = t.topk(min(top_k, t.shape[-1]), dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    return _divergence(s, t, divergence, temperature, beta, scale_by_t2)


def topk_divergence(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                    divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                    scale_by_t2: bool = False) -> torch.Tensor:
    """`logit_divergence` with top_k = k when only the teacher's k largest logits are known
    ([N, k] values and their token ids, as the teacher cache keeps them): the same loss."""
    s = _at_least_fp32(student_logits).gather(-1, teacher_indices) / temperature
    t = _at_least_fp32(teacher_values) / temperature
    return _divergence(s, t, divergence, temperature, beta, scale_by_t2)


def _divergence(s: torch.Tensor, t: torch.Tensor, divergence: str, temperature: float, beta: float,
                scale_by_t2: bool) -> torch.Tensor:
    logq, logp = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if divergence == "forward_kl":
        loss = kl(logp, logq)
    elif divergence == "reverse_kl":
        loss = kl(logq, logp)
    elif divergence == "jsd":
        loss = generalized_jsd(logp, logq, beta)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    return loss * temperature ** 2 if scale_by_t2 else loss


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] next-token cross-entropy, in float32 whatever the logits' dtype."""
    return F.cross_entropy(_at_least_fp32(student_logits), targets, reduction="none")


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Scalar loss between [..., H] hidden states of equal width (project the student first):
    mean over tokens of 1 - cos, or mean squared error over tokens and channels."""
    student, teacher = _at_least_fp32(student), _at_least_fp32(teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown hidden-state loss {kind!r}; choose cosine or mse")


def token_losses(student_logits: torch.Tensor, teacher_logits, targets: torch.Tensor, spec, teacher_topk=None):
    """The per-token terms a spec asks for: (divergence [N] or None, cross-entropy [N] or None).

    `spec` carries divergence ("none" for no teacher term), temperature, top_k, beta,
    scale_by_t2 and ce_weight (the `distill.logits` config section). `teacher_topk`: ([N, k]
    values, indices), largest first, in place of `teacher_logits` (the teacher cache); the
    divergence is then over their first top_k (all k when top_k is 0)."""
    kd = None
    if spec.divergence != "none" and teacher_topk is not None:
        values, indices = teacher_topk
        k = spec.top_k or values.shape[-1]
        kd = topk_divergence(student_logits, values[:, :k], indices[:, :k], spec.divergence, spec.temperature,
                             spec.beta, spec.scale_by_t2)
    elif spec.divergence != "none":
        kd = logit_divergence(student_logits, teacher_logits, spec.divergence, spec.temperature, spec.top_k,
                              spec.beta, spec.scale_by_t2)
    ce = cross_entropy(student_logits, targets) if spec.ce_weight else None
    return kd, ce


def combine_token_losses(kd, ce, spec) -> torch.Tensor:
    """[N] training loss per token: divergence + ce_weight * cross-entropy."""
    terms = [t for t in (kd, spec.ce_weight * ce if ce is not None else None) if t is not None]
    return sum(terms[1:], terms[0])
