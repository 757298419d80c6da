"""minitron-plan: predicted peak memory per rank of a distillation, before launch (see conf/plan.yaml)."""
from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _plan(cfg: DictConfig) -> None:
    from minitron.memory.job import run_plan_job

    summary = run_plan_job(OmegaConf.to_object(cfg))
    print(f"teacher {summary['teacher_params']:,} + student {summary['student_params']:,} parameters, "
          f"{summary['processes']} process(es), micro batch {summary['micro_batch_size']} x {summary['seq_len']} "
          f"tokens, on {summary['device']}:", flush=True)
    print(summary["table"], flush=True)
    if summary["recommended"]:
        print(f"recommended: {summary['recommended']}", flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("plan", _plan, saved_config=None)


if __name__ == "__main__":
    main()
