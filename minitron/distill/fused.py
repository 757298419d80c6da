"""The logit loss computed chunk by chunk of tokens, straight from final hidden states and the
two `lm_head` weights, so [tokens x vocab] float32 logits never exist for the whole batch.

For 8 sequences of 4096 tokens over a 128k vocabulary, full float32 logits are 16 GiB per model,
and a naive KL keeps several such tensors (both log-softmaxes, their difference, the gradient).
Here each chunk's logits are made, turned into a loss and a gradient with respect to the
student's logits, and folded into the gradients for the student's hidden states and `lm_head`
weight right away (the approach of Liger-Kernel's fused linear cross-entropy); only one chunk's
logits are alive at a time, and backward just hands the stored gradients on. The per-chunk loss
is `losses.token_losses` under autograd, so every divergence and option of the pure functions
works here; the default (plain forward KL) takes a path without autograd: in place on CPU, a
Triton kernel on GPU (triton_kl.py).

Families whose logits are soft-capped (Gemma 2 and 3: c * tanh(lm_head(h) / c)) pass their caps:
each chunk's logits are capped before the loss, and the gradient goes back through the cap
(times 1 - tanh^2) before it is folded into the hidden states and weight.

Correct under ZeRO-3 as long as the caller passes full (gathered) weights: the gradient for the
weight is returned to autograd whole, and DeepSpeed partitions it as usual. With tied embeddings
the weight is the embedding matrix and autograd adds both gradients.
"""
from typing import Dict, Optional, Tuple

import torch

from minitron.distill import losses, triton_kl

CPU_BLOCK_BYTES = 4 << 20  # a block of p's rows on a CPU: three such slices fit a server's L3 cache


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, vocab_size,
                spec, chunk_tokens, student_softcap, teacher_softcap, teacher_topk):
        num_tokens = student_hidden.shape[0]
        kl_with_grad = (triton_kl.forward_kl_with_grad if triton_kl.use_triton(spec.kernel, student_hidden.device)
                        else forward_kl_with_grad)
        w_student = student_weight[:vocab_size]
        w_teacher = teacher_weight[:vocab_size] if teacher_weight is not None else None
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros_like(student_weight)  # rows past vocab_size (padding) get none
        sums = torch.zeros(3, dtype=torch.float64, device=student_hidden.device)  # loss, kd, ce
        plain = is_plain_forward_kl(spec) and teacher_topk is None
        teacher_buffer, student_buffer = (
            _cpu_chunk_buffers(student_hidden, teacher_hidden, min(chunk_tokens, num_tokens), vocab_size)
            if plain and kl_with_grad is forward_kl_with_grad else (None, None))
        for start in range(0, num_tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = student_hidden[rows]
            teacher_logits = _logits(teacher_hidden[rows], w_teacher, teacher_buffer) if w_teacher is not None else None
            if teacher_logits is not None:
                teacher_logits = softcapped(teacher_logits, teacher_softcap)
            logits = _logits(h, w_student, student_buffer)
            if plain:
                tanh = None
                if student_softcap:
                    tanh = torch.tanh(logits.float().div_(student_softcap))
                    logits = tanh * student_softcap
                kd, grad_logits = kl_with_grad(logits, teacher_logits, spec.temperature, spec.scale_by_t2)
                del logits  # only the gradient (made in place of the student's probabilities) lives on
                if tanh is not None:  # d(c tanh(z / c))/dz = 1 - tanh^2
                    grad_logits.mul_(tanh.square_().neg_().add_(1))
                    del tanh
                grad_logits = grad_logits.div_(num_tokens).to(h.dtype)
                ce, chunk_loss = None, kd.sum() / num_tokens
            else:
                with torch.enable_grad():
                    logits.requires_grad_()
                    kd, ce = losses.token_losses(softcapped(logits, student_softcap), teacher_logits,
                                                 targets[rows], spec,
                                                 teacher_topk=tuple(t[rows] for t in teacher_topk)
                                                 if teacher_topk is not None else None)
                    chunk_loss = losses.combine_token_losses(kd, ce, spec).sum() / num_tokens
                    (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
            torch.mm(grad_logits, w_student, out=grad_hidden[rows])
            grad_weight[:vocab_size].addmm_(grad_logits.T, h)
            sums += torch.stack([chunk_loss.detach().double() * num_tokens,
                                 kd.detach().sum().double() if kd is not None else sums.new_zeros(()),
                                 ce.detach().sum().double() if ce is not None else sums.new_zeros(())])
        ctx.save_for_backward(grad_hidden, grad_weight)
        means = (sums / num_tokens).float()
        ctx.mark_non_differentiable(means)
        return means[0], means

    @staticmethod
    def backward(ctx, grad_loss, _grad_means):
        # Scaled in place: a copy of the weight gradient would be another [V x H] at the peak.
        # (So this graph cannot be backpropagated twice, which training never does.)
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss.item() != 1.0:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def softcapped(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """cap * tanh(logits / cap) in float32, as Gemma 2 and 3 bound their final logits; the logits
    unchanged when there is no cap."""
    return torch.tanh(logits.float() / cap) * cap if cap else logits


def is_plain_forward_kl(spec) -> bool:
    return (spec.divergence == "forward_kl" and not spec.top_k and not spec.ce_weight)


def forward_kl_with_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                         scale_by_t2: bool):
    """The default loss without autograd: [N] KL(p || q) and its gradient with respect to the
    student's logits, (q - p) / T (times T^2 if scaled), with p, q the softened teacher and student
    distributions. Equal to `losses.logit_divergence` (tested). Float32 inputs are overwritten:
    everything happens in the two logits buffers plus a block of rows for p, where autograd
    through the pure function would keep about six [N x V] tensors.
    Returns (kd [N], gradient [N, V] float32, in the student's buffer when it was float32)."""
    logq = losses._at_least_fp32(student_logits)
    logp = losses._at_least_fp32(teacher_logits)
    num_rows, vocab = logq.shape
    # On a CPU, a few rows at a time: their three [rows x V] slices stay in the cache through
    # all six passes instead of streaming the whole chunk from memory for each.
    rows = max(1, CPU_BLOCK_BYTES // (4 * vocab)) if logq.device.type == "cpu" else num_rows
    p = torch.empty(min(rows, num_rows), vocab, dtype=logq.dtype, device=logq.device)
    kd = torch.empty(num_rows, dtype=logq.dtype, device=logq.device)
    factor = temperature if scale_by_t2 else 1.0 / temperature  # d/dz of T^2 * KL = T * (q - p)
    for start in range(0, num_rows, rows):
        block = slice(start, start + rows)
        lq, lp = _log_softmax_(logq[block], temperature), _log_softmax_(logp[block], temperature)
        pb = torch.exp(lp, out=p[:len(lq)])
        kd[block] = torch.linalg.vecdot(pb, lp.sub_(lq))
        grad = lq.exp_().sub_(pb)  # in place of log q: the gradient
        if factor != 1.0:
            grad.mul_(factor)
    return (kd * temperature ** 2 if scale_by_t2 else kd), logq


def _log_softmax_(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T), in place on a CPU. ATen's CPU kernel finishes reading a row before
    it writes it, so its out= may alias the input: one vectorised pass where logsumexp and a
    subtraction take five and a temporary."""
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.device.type == "cpu":
        return torch._log_softmax(logits, -1, False, out=logits)
    return logits.sub_(logits.logsumexp(-1, keepdim=True))


def _cpu_chunk_buffers(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, rows: int,
                       vocab_size: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Two [rows, vocab] float32 buffers (the teacher's chunk logits, the student's), when both models'
    hidden states are float32 on a CPU; (None, None) elsewhere. On a CPU fresh [chunk x vocab] tensors for every chunk
    pay their page faults again each time (a fifth of the loss's time at a 128k vocabulary); a
    GPU's caching allocator already reuses them."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (student_hidden, teacher_hidden)):
        return None, None
    return torch.empty(rows, vocab_size), torch.empty(rows, vocab_size)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden @ weight.T, into `buffer`'s first rows when one is given."""
    return torch.mm(hidden, weight.T, out=buffer[:len(hidden)]) if buffer is not None else hidden @ weight.T


def chunked_logit_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       teacher_hidden, teacher_weight, targets: torch.Tensor, vocab_size: int, spec,
                       chunk_tokens: int = 1024, student_softcap: Optional[float] = None,
                       teacher_softcap: Optional[float] = None,
                       teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mean over the N tokens of `losses.combine_token_losses` for logits `hidden @ weight[:vocab].T`,
    soft-capped by each model's cap when it has one.

    student_hidden [N, H] and student_weight [V, H] get gradients; teacher_hidden [N, K] and
    teacher_weight [V', K] are constants (both None when the spec has no divergence term, or
    when `teacher_topk`, the teacher cache's [N, k] values and token ids, stands in for them).
    `vocab_size` is the shared tokenizer's size: padded vocabulary rows beyond it are ignored.
    Returns the loss and its detached parts {"kd", "ce"} (means over tokens).
    """
    loss, means = _ChunkedLogitLoss.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                          targets, vocab_size, spec, chunk_tokens, student_softcap, teacher_softcap,
                                          teacher_topk)
    return loss, {"kd": means[1], "ce": means[2]}
