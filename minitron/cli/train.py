"""minitron-train: pretrain or continue training a causal LM (see conf/train.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _train(cfg: DictConfig) -> None:
    from minitron.train.job import run_training_job

    summary = run_training_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") == "0":
        print(f"val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}  "
              f"model {summary['output_model']}", flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("train", _train, saved_config="config.yaml")


if __name__ == "__main__":
    main()
