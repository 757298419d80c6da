"""minitron-plan: predicted peak memory per rank of a distillation, before launch (conf/plan.yaml);
`minitron-plan prune ...`: of a pruning (conf/plan_prune.yaml)."""
import sys

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _plan(cfg: DictConfig) -> None:
    from minitron.memory.job import run_plan_job

    summary = run_plan_job(OmegaConf.to_object(cfg))
    models = "teacher {:,} + student {:,}" if summary["job"] == "distill" else "teacher {:,} pruned to {:,}"
    print(f"{models.format(summary['teacher_params'], summary['student_params'])} parameters, "
          f"{summary['processes']} process(es), micro batch {summary['micro_batch_size']} x {summary['seq_len']} "
          f"tokens, on {summary['device']}:", flush=True)
    print(summary["table"], flush=True)
    if summary["recommended"]:
        print(f"recommended: {summary['recommended']}", flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    config_name = "plan"
    if sys.argv[1:2] in (["prune"], ["distill"]):  # the job planned; distill is the default
        config_name = "plan_prune" if sys.argv.pop(1) == "prune" else "plan"
    run_hydra(config_name, _plan, saved_config=None)


if __name__ == "__main__":
    main()
