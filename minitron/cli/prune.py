"""minitron-prune: prune a teacher checkpoint to a smaller shape (see conf/prune.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _prune(cfg: DictConfig) -> None:
    from minitron.prune.job import run_prune_job

    summary = run_prune_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") != "0":
        return
    line = f"teacher {summary['teacher_params']:,} -> student {summary['student_params']:,} parameters"
    if "student_active_params" in summary:
        line += (f" ({summary['teacher_active_params']:,} -> {summary['student_active_params']:,} active "
                 "per token)")
    if not summary.get("dry_run"):
        line += (f"  val_loss {summary['teacher_val_loss']:.4f} -> {summary['student_val_loss']:.4f}"
                 f"  model {summary['output_model']}")
    print(line, flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("prune", _prune, saved_config="prune_config.yaml")


if __name__ == "__main__":
    main()
