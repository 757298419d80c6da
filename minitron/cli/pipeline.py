"""minitron-pipeline: one teacher to an evaluated family of students (see conf/pipeline.yaml)."""
import os

from omegaconf import DictConfig, OmegaConf

from minitron.config import register_schemas


def _pipeline(cfg: DictConfig) -> None:
    from minitron.pipeline.job import run_pipeline_job

    summary = run_pipeline_job(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    if os.environ.get("RANK", "0") != "0":
        return
    if summary["table"]:
        print(summary["table"], flush=True)
    if summary["samples"]:
        print(summary["samples"], flush=True)
    skipped = f"; skipped (already done): {', '.join(summary['stages_skipped'])}" if summary["stages_skipped"] else ""
    if "report" in summary:
        print(f"report: {summary['report']}{skipped}", flush=True)
    else:
        print(f"summary: {os.path.join(OmegaConf.select(cfg, 'output_dir'), 'summary.json')}{skipped}", flush=True)


def main() -> None:
    from minitron.cli.common import run_hydra

    register_schemas()
    run_hydra("pipeline", _pipeline)


if __name__ == "__main__":
    main()
