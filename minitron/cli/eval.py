"""minitron-eval: validation perplexity and lm-eval tasks of any checkpoint (see conf/eval.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _eval(cfg: DictConfig) -> None:
    from minitron.eval.job import run_eval_job
    from minitron.eval.sample import format_sample

    summary = run_eval_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") != "0":
        return
    tasks = "".join(f"  {task} {', '.join(f'{m} {v:.4f}' for m, v in scores.items() if not m.endswith('stderr'))}"
                    for task, scores in summary["tasks"].items())
    print(f"val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}  "
          f"params {summary['params']:,}{tasks}", flush=True)
    if "sample" in summary:
        print(format_sample("the model", cfg.eval.sample_prompt, summary["sample"]), flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("eval", _eval, saved_config="eval_config.yaml")


if __name__ == "__main__":
    main()
