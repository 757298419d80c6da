"""The Minitron papers' central result at small scale (arXiv 2407.14679 section 4): a student
pruned from the embedded teacher to about half its parameters and distilled for a fixed token
budget reaches a lower validation LM loss than (a) the same pruned student retrained with plain
LM loss on the same tokens and (b) the same architecture trained from random initialisation on
the same tokens."""
import json

import pytest

from conftest import PRUNE, run_cli
from distill.test_distill_cli import DISTILL

STEPS = 60  # x 8 blocks x 256 tokens = 123k tokens, about 1% of what the teacher saw


@pytest.mark.slow
def test_distillation_beats_lm_retraining_and_random_init(embedded_teacher, tmp_path):
    teacher = embedded_teacher / "model"
    pruned = tmp_path / "pruned"
    # Width pruning (the paper's preferred axis at this ratio): hidden 384 -> 256, ffn 1024 -> 512.
    run_cli([f"model.path={teacher}", f"output_dir={pruned}", "prune.export.hidden_size=256",
             "prune.export.ffn_hidden_size=512", "prune.calibration.num_samples=256", "prune.depth.eval_blocks=16"],
            launcher=PRUNE, timeout=900)
    sizes = json.loads((pruned / "summary.json").read_text())
    assert 0.4 < sizes["student_params"] / sizes["teacher_params"] < 0.55

    def distill(name, *extra):
        out = tmp_path / name
        # One tokenizer directory for every run, so all of them share one tokenised data cache.
        run_cli([f"teacher.path={teacher}", f"student.path={pruned}", f"data.tokenizer={teacher}",
                 f"output_dir={out}", "logger=none", f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
                 "train.save_every=0", *extra], launcher=DISTILL, timeout=900)
        return json.loads((out / "summary.json").read_text())

    kd = distill("kd")
    lm = distill("lm", "distill=lm")
    scratch = distill("scratch", "distill=lm", "student.init=random")
    assert kd["tokens_seen"] == lm["tokens_seen"] == scratch["tokens_seen"]
    print(f"val loss: pruned {sizes['student_val_loss']:.3f}, teacher {kd['teacher_val_loss']:.3f}; after "
          f"{kd['tokens_seen']} tokens: distilled {kd['val_loss']:.3f}, LM-retrained {lm['val_loss']:.3f}, "
          f"from scratch {scratch['val_loss']:.3f}")
    assert kd["val_loss"] < lm["val_loss"] - 0.02
    assert kd["val_loss"] < scratch["val_loss"] - 0.5
