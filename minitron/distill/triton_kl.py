"""A Triton kernel for the default loss on GPU: per row of [N, V] logits, forward KL(p || q) of
the softened teacher and student distributions and its gradient (q - p) * scale, in two passes
over the row (online log-sum-exp, then loss and gradient) with nothing but the gradient written.

It replaces `fused.forward_kl_with_grad` (same inputs, same outputs) when the logits are on a GPU
and Triton imports; the PyTorch version is the reference it is tested against (on CPU, through
Triton's interpreter: TRITON_INTERPRET=1). Importing this module never fails: without Triton,
`available()` is False.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; flash-attn and triton are GPU extras
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _forward_kl_rows(student_ptr, teacher_ptr, grad_ptr, loss_ptr, student_stride, teacher_stride, grad_stride,
                         vocab, inv_temperature, grad_scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        student_row = student_ptr + row * student_stride
        teacher_row = teacher_ptr + row * teacher_stride
        # Pass 1: running max and sum of exponentials of both rows (online log-sum-exp).
        max_s = float("-inf")
        sum_s = 0.0
        max_t = float("-inf")
        sum_t = 0.0
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < vocab
            s = tl.load(student_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max_s = tl.maximum(max_s, tl.max(s, 0))
            sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(s - new_max_s), 0)
            max_s = new_max_s
            new_max_t = tl.maximum(max_t, tl.max(t, 0))
            sum_t = sum_t * tl.exp(max_t - new_max_t) + tl.sum(tl.exp(t - new_max_t), 0)
            max_t = new_max_t
        lse_s = max_s + tl.log(sum_s)
        lse_t = max_t + tl.log(sum_t)
        # Pass 2: the loss and the gradient. grad_ptr may alias student_ptr (fp32 logits): each
        # block is read before it is overwritten.
        loss = 0.0
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < vocab
            s = tl.load(student_row + offsets, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + offsets, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            log_q = s - lse_s
            log_p = t - lse_t
            p = tl.exp(log_p)
            loss += tl.sum(tl.where(mask, p * (log_p - log_q), 0.0), 0)
            tl.store(grad_ptr + row * grad_stride + offsets, (tl.exp(log_q) - p) * grad_scale, mask=mask)
        tl.store(loss_ptr + row, loss)


def forward_kl_with_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                         scale_by_t2: bool, block: int = 4096):
    """As `fused.forward_kl_with_grad`: ([N] loss, [N, V] float32 gradient w.r.t. the student's
    logits). Float32 student logits are overwritten by the gradient (they are not needed after)."""
    assert available(), "triton is not installed"
    student_logits = student_logits.contiguous()
    teacher_logits = teacher_logits.contiguous()
    num_rows, vocab = student_logits.shape
    grad = student_logits if student_logits.dtype == torch.float32 else torch.empty(
        (num_rows, vocab), dtype=torch.float32, device=student_logits.device)
    loss = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    grad_scale = temperature if scale_by_t2 else 1.0 / temperature
    block = min(block, triton.next_power_of_2(vocab))
    _forward_kl_rows[(num_rows,)](student_logits, teacher_logits, grad, loss, student_logits.stride(0),
                                  teacher_logits.stride(0), grad.stride(0), vocab, 1.0 / temperature, grad_scale,
                                  BLOCK=block)
    return (loss * temperature ** 2 if scale_by_t2 else loss), grad


def use_triton(kernel: str, device: torch.device) -> bool:
    """kernel: auto (Triton on a GPU when it is installed), torch, or triton (required)."""
    if kernel == "torch":
        return False
    if kernel == "triton":
        return True
    return device.type == "cuda" and available()
