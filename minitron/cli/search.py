"""minitron-search: rank pruned shapes of a teacher under a budget (see conf/search.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _search(cfg: DictConfig) -> None:
    from minitron.search.job import run_search_job

    summary = run_search_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") != "0":
        return
    if "table" in summary:
        print(summary["table"], flush=True)
    if summary.get("dry_run"):
        listed = summary["num_listed"]
        meet = "candidates meet" if listed != 1 else "candidate meets"
        print(f"{listed} {meet} the budgets ({summary['num_chosen']} would be ranked); "
              f"teacher {summary['teacher_params']:,} parameters", flush=True)
    elif "winner" in summary:
        w = summary["winner"]
        print(f"winner {w['name']}: {w['params']:,} parameters, val_loss {w['distill_val_loss']:.4f} after "
              f"{w['distill_steps']} steps (zero-shot {w['zero_shot_val_loss']:.4f}); "
              f"{summary['distill_tokens']:,} distillation tokens  model {summary['output_model']}", flush=True)
    else:
        waiting = ", ".join(summary["waiting_for"]) or "nothing"
        print(f"candidate {summary['candidate']}: done up to round {summary['round']}; waiting for {waiting}",
              flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("search", _search)


if __name__ == "__main__":
    main()
