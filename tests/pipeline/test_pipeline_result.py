"""README command 1, as written (only output_dir differs): the embedded pipeline pretrains the
default teacher, searches a half and a quarter of it, distils both, evaluates every model on the
same validation blocks and prints the table and the teacher's greedy sample, which reads as
Python. Distillation must pay: each distilled student beats its pruned-only version by a wide
margin, and the report holds what the table says."""
import json

import pytest

from conftest import reads_as_python
from minitron.eval.sample import format_sample


@pytest.mark.slow
def test_embedded_pipeline_distilled_students_beat_their_pruned_versions(embedded_pipeline):
    out, stdout, seconds = embedded_pipeline
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["name"], r["kind"]): r for r in summary["models"]}
    teacher = rows[("teacher", "teacher")]
    print(f"pipeline: {seconds:.0f} s; stages {summary['stage_seconds']}")
    for name, fraction in (("half", 0.5), ("quarter", 0.25)):
        pruned, distilled = rows[(name, "pruned")], rows[(name, "distilled")]
        assert abs(pruned["params"] / (fraction * teacher["params"]) - 1) <= 0.05, (name, pruned["params"])
        assert pruned["params"] == distilled["params"]
        print(f"{name}: {pruned['params']:,} params, ppl pruned {pruned['val_ppl']:.1f} -> distilled "
              f"{distilled['val_ppl']:.1f} (teacher {teacher['val_ppl']:.1f})")
        # A wide margin: at least a fifth off the pruned-only perplexity (0.22 nats).
        assert distilled["val_ppl"] < 0.8 * pruned["val_ppl"], (name, pruned["val_ppl"], distilled["val_ppl"])
        assert distilled["val_ppl"] > teacher["val_ppl"] * 0.9  # a smaller student does not beat its teacher
    # The printed table: a header and a row per model, the same numbers as summary.json.
    lines = [line.split() for line in stdout.splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:3] == ["model", "kind", "params"])
    printed = {(line[0], line[1]): float(line[4]) for line in lines[header + 1:header + 1 + len(rows)]}
    assert printed == {key: pytest.approx(r["val_ppl"], abs=0.006) for key, r in rows.items()}
    # Then the greedy samples of the teacher and the distilled students; the teacher's reads as Python.
    sample = rows[("teacher", "teacher")]["sample"]
    assert reads_as_python(sample), sample
    shown = format_sample("teacher (teacher)", "def ", sample)
    assert shown in stdout and stdout.index(shown) > stdout.index("quarter  distilled")
    report = (out / "report.md").read_text()
    assert shown in report
    for (name, kind), r in rows.items():
        assert f"| {name} | {kind} | {r['params'] / 1e6:,.2f}M | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |" in report
    for plot in ("loss_vs_tokens.png", "params_vs_ppl.png"):
        assert (out / plot).stat().st_size > 10_000, plot
