"""What a pipeline run leaves for people: the table (terminal, report.md, W&B) and two plots:
validation loss against distillation tokens for each student with the teacher as a line, and
parameters against perplexity for the teacher, the pruned-only and the distilled students."""
import json
import math
import os
from pathlib import Path
from typing import List

from minitron.eval.sample import format_sample

KIND_STYLE = {"teacher": ("tab:green", "*"), "pruned": ("tab:red", "x"), "distilled": ("tab:blue", "o")}


def task_columns(rows: List[dict]) -> List[str]:
    """`task/metric` for every task score (stderr left to report.md's detail)."""
    names = []
    for row in rows:
        for task, scores in row.get("tasks", {}).items():
            names += [f"{task}/{m}" for m in scores if not m.endswith("stderr") and f"{task}/{m}" not in names]
    return names


def table(rows: List[dict]) -> List[list]:
    """[header, *rows]: model, kind, params, val loss, val ppl and each task score, as strings."""
    tasks = task_columns(rows)
    out = [["model", "kind", "params", "val_loss", "val_ppl", *tasks]]
    for r in rows:
        scores = [r.get("tasks", {}).get(t.split("/")[0], {}).get(t.split("/")[1]) for t in tasks]
        out.append([r["name"], r["kind"], f"{r['params'] / 1e6:,.2f}M", f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}",
                    *("-" if s is None else f"{s:.4f}" for s in scores)])
    return out


def format_table(rows: List[dict]) -> str:
    cells = table(rows)
    widths = [max(len(c) for c in col) for col in zip(*cells)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def markdown_table(rows: List[dict]) -> str:
    cells = table(rows)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells[1:]])


def samples(rows: List[dict], prompt: str, kinds=("teacher", "pruned", "distilled")) -> str:
    """The greedy samples the eval stage kept (eval.sample_prompt), of the rows of these kinds."""
    return "\n".join(format_sample(f"{r['name']} ({r['kind']})", prompt, r["sample"])
                     for r in rows if "sample" in r and r["kind"] in kinds)


def loss_curve(run_dir: str) -> List[tuple]:
    """(tokens seen, validation loss) at every evaluation of a distillation run, from its
    metrics.jsonl (the last row for a step wins: a resumed run repeats steps after its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "val/loss" in row:
            by_step[row["step"]] = (row["train/tokens_seen"], row["val/loss"])
    return [by_step[s] for s in sorted(by_step)]


def shape_of(model_dir: str) -> str:
    """L<layers>-H<hidden>-F<ffn>-A<heads>-K<kv heads>, as the search names shapes."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    return (f"L{c['num_hidden_layers']}-H{c['hidden_size']}-F{c['intermediate_size']}-A{c['num_attention_heads']}"
            f"-K{c.get('num_key_value_heads') or c['num_attention_heads']}")


def _axes():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_loss_vs_tokens(path: Path, rows: List[dict]) -> None:
    """One line per distilled student (starting from its pruned-only loss at 0 tokens), the teacher
    as a dashed line."""
    fig, ax = _axes()
    pruned = {r["name"]: r["val_loss"] for r in rows if r["kind"] == "pruned"}
    for r in rows:
        if r["kind"] != "distilled":
            continue
        curve = loss_curve(r["run_dir"])
        if r["name"] in pruned:
            curve = [(0, pruned[r["name"]]), *curve]
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", markersize=3,
                label=f"{r['name']} ({r['params'] / 1e6:,.2f}M params)")
    for r in rows:
        if r["kind"] == "teacher":
            ax.axhline(r["val_loss"], color="tab:green", linestyle="--",
                       label=f"teacher ({r['params'] / 1e6:,.2f}M params)")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("validation LM loss")
    ax.set_title("Students during distillation")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_params_vs_ppl(path: Path, rows: List[dict]) -> None:
    fig, ax = _axes()
    for kind, (color, marker) in KIND_STYLE.items():
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        ax.scatter([r["params"] for r in chosen], [r["val_ppl"] for r in chosen], color=color, marker=marker,
                   s=60, label={"pruned": "pruned only"}.get(kind, kind), zorder=2)
        for r in chosen:
            ax.annotate(r["name"], (r["params"], r["val_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for name in {r["name"] for r in rows if r["kind"] == "distilled"}:  # pruned -> distilled, per student
        pair = [r for r in rows if r["name"] == name and r["kind"] in ("pruned", "distilled")]
        if len(pair) == 2:
            ax.plot([r["params"] for r in pair], [r["val_ppl"] for r in pair], color="0.75", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("Teacher and students")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(out: Path, rows: List[dict], logger_cfg, prompt: str) -> Path:
    """report.md, loss_vs_tokens.png and params_vs_ppl.png in `out`, and the same in W&B."""
    from minitron.train.tracking import make_tracker

    plot_loss_vs_tokens(out / "loss_vs_tokens.png", rows)
    plot_params_vs_ppl(out / "params_vs_ppl.png", rows)
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    lines = ["# minitron pipeline report", "",
             f"Teacher: `{teacher['path']}`" if teacher else "", "",
             "Every model is evaluated on the same validation blocks "
             f"({rows[0].get('val_blocks', '?')} blocks); perplexity is exp(validation LM loss).", "",
             markdown_table(rows), "",
             "![validation loss against distillation tokens](loss_vs_tokens.png)", "",
             "![parameters against perplexity](params_vs_ppl.png)", "", "## Models", ""]
    for r in rows:
        lines.append(f"- {r['name']} ({r['kind']}, {shape_of(r['path'])}): `{r['path']}`")
    if any("sample" in r for r in rows):
        lines += ["", "## Greedy samples", "", "```", samples(rows, prompt), "```"]
    text = "\n".join(lines) + "\n"
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    tracker = make_tracker(logger_cfg, out, {"models": len(rows)}, rank=0)
    cells = table(rows)
    # The step-0 row first: W&B refuses (and warns about) a step below one it has logged, and the
    # table and images take the next steps.
    tracker.log({f"pipeline/{r['name']}/{r['kind']}/val_ppl": r["val_ppl"] for r in rows
                 if math.isfinite(r["val_ppl"])}, step=0)
    tracker.log_table("pipeline/models", cells[0], cells[1:])
    tracker.log_image("pipeline/loss_vs_tokens", out / "loss_vs_tokens.png")
    tracker.log_image("pipeline/params_vs_ppl", out / "params_vs_ppl.png")
    tracker.finish()
    return out / "report.md"
