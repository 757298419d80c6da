"""minitron-distill: retrain a student from a frozen teacher (see conf/distill.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _distill(cfg: DictConfig) -> None:
    from minitron.distill.job import run_distill_job

    summary = run_distill_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") == "0":
        teacher = f"  teacher val_loss {summary['teacher_val_loss']:.4f}" if "teacher_val_loss" in summary else ""
        print(f"val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}{teacher}  "
              f"model {summary['output_model']}", flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("distill", _distill, saved_config="config.yaml")


if __name__ == "__main__":
    main()
