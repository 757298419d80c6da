"""Distillation: losses, the fused chunked logit loss, the frozen teacher, minitron-distill."""
