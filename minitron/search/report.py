"""What a search leaves for people: the ranked table (CSV, terminal, W&B) and a plot of parameters
against validation loss, zero-shot and after distillation, the winner marked."""
import csv
import os
from pathlib import Path
from typing import List

COLUMNS = ["rank", "name", "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size",
           "num_attention_heads", "num_key_value_heads", "params", "active_params", "non_embedding_params",
           "memory_gb", "flops_per_token", "zero_shot_val_loss", "zero_shot_kl", "distill_steps", "distill_val_loss"]


MOE_COLUMNS = ("num_experts", "moe_ffn_hidden_size", "active_params")


def columns(candidates: List[dict]) -> List[str]:
    """COLUMNS, without the mixture-of-experts ones for a dense teacher's candidates."""
    moe = any(c.get("num_experts") is not None for c in candidates)
    return [k for k in COLUMNS if moe or k not in MOE_COLUMNS]


def table_rows(candidates: List[dict]) -> List[list]:
    """One row per candidate in `columns` order (missing scores as None), best first when ranked."""
    ranked = sorted(candidates, key=lambda c: (c.get("rank") is None, c.get("rank") or 0))
    return [[c.get(k) for k in columns(candidates)] for c in ranked]


def write_csv(path: Path, candidates: List[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns(candidates))
        writer.writerows(table_rows(candidates))
    os.replace(tmp, path)


def format_table(candidates: List[dict], limit: int = 40) -> str:
    """The table for the terminal: the first `limit` rows, sizes in millions, columns that have a
    value (a dry run has no scores)."""
    def cell(key, value):
        if value is None:
            return "-"
        if key in ("params", "active_params", "non_embedding_params"):
            return f"{value / 1e6:,.2f}M"
        if key == "flops_per_token":
            return f"{value / 1e6:,.1f}M"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table, keys = table_rows(candidates), columns(candidates)
    shown = [j for j, k in enumerate(keys) if k != "name" and any(r[j] is not None for r in table)]
    header = ["name", *(keys[j] for j in shown)]
    rows = [[str(r[1]), *(cell(keys[j], r[j]) for j in shown)] for r in table[:limit]]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    if len(candidates) > limit:
        lines.append(f"... {len(candidates) - limit} more in search.csv")
    return "\n".join(lines)


def plot(path: Path, candidates: List[dict], winner: str, teacher_params: int, teacher_loss: float) -> None:
    """Parameters against validation loss: each candidate zero-shot (after pruning) and after its
    last distillation round, joined by a line; the winner ringed; the teacher as a reference."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in candidates:
        ax.plot([c["params"]] * 2, [c["zero_shot_val_loss"], c["distill_val_loss"]], color="0.8", zorder=1)
    ax.scatter([c["params"] for c in candidates], [c["zero_shot_val_loss"] for c in candidates],
               marker="x", color="tab:red", label="zero-shot (pruned only)", zorder=2)
    ax.scatter([c["params"] for c in candidates], [c["distill_val_loss"] for c in candidates],
               marker="o", color="tab:blue", label="after distillation (last round)", zorder=2)
    best = next(c for c in candidates if c["name"] == winner)
    ax.scatter([best["params"]], [best["distill_val_loss"]], s=220, facecolors="none", edgecolors="black",
               linewidths=1.5, label=f"winner {winner}", zorder=3)
    ax.axhline(teacher_loss, color="tab:green", linestyle="--",
               label=f"teacher ({teacher_params / 1e6:,.1f}M params)")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation LM loss")
    ax.set_title("minitron-search: candidates under the budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
