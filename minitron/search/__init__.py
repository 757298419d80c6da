"""Architecture search: candidate shapes under a budget, ranked by zero-shot scores and short distillation."""
