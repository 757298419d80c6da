"""The pipeline job (`minitron-pipeline`): one teacher to an evaluated family of students, the
Minitron recipe (arXiv 2407.14679; 2408.11796 for teacher correction) as a chain of the existing
jobs called as functions: pretrain the embedded teacher (no model.path) -> correct -> importance
(once, shared by every target) -> search (budget targets) or prune (explicit shapes) -> distill
-> eval -> report.

Every stage writes under `output_dir/<stage>/<name>-<key>/`, the key hashing the stage's settings
and the keys of what it reads (pipeline/plan.py). A stage whose run finished (a summary.json not marked interrupted) is skipped;
one that was killed resumes (the training jobs from their last checkpoint, the search from its
candidates' files), so a rerun of a finished pipeline only reads results.
"""
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from minitron.config import (DistillJobConfig, LoggerConfig, ModelConfig, PipelineJobConfig, PruneJobConfig,
                             TeacherConfig, TrainJobConfig)
from minitron.data.packing import build_or_load
from minitron.distributed.gang import init_gang
from minitron.distributed.partitions import release
from minitron.eval.job import evaluate_model
from minitron.models.build import build_model, resolve_hf_config
from minitron.pipeline import report
from minitron.pipeline.plan import PipelinePlan, Target, checkpoint_identity, plan_pipeline, search_config, spec_key
from minitron.run import finished_summary, write_json_atomic

log = logging.getLogger(__name__)

NO_LOGGER = LoggerConfig(backend="none")  # stages log to metrics.jsonl; the pipeline's own run has the report


@dataclasses.dataclass
class Model:
    """A checkpoint the pipeline made or was given, and the key that names it in later stages."""
    label: str
    kind: str  # teacher, pruned or distilled
    path: str
    key: str
    run_dir: Optional[str] = None
    """The run that made it (its metrics.jsonl feeds the report)."""


def _yaml(job) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))


@dataclasses.dataclass
class Ledger:
    """Which stages ran, with their seconds, and which were skipped as already done."""
    gang: object
    seconds: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)

    def run(self, stage: str, label: str, done: Path, skip_name: str, work: Callable[[], None]) -> None:
        """`work()`, announced and timed, unless `done` (the file a finished stage leaves) exists."""
        if finished_summary(done) is not None:  # not an interrupted run's summary
            self.skipped.append(skip_name)
            return
        if self.gang.rank == 0:
            log.info("stage %s: %s", stage, label)
        t0 = time.perf_counter()
        work()
        self.seconds[f"{stage}/{label}"] = round(time.perf_counter() - t0, 1)


def run_pipeline_job(cfg: PipelineJobConfig, config_yaml: str) -> dict:
    plan = plan_pipeline(cfg)
    gang = init_gang()
    out = Path(cfg.output_dir)
    if gang.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline_config.yaml").write_text(config_yaml)
    ledger = Ledger(gang)
    teacher = pretrain_teacher(cfg, out, ledger)
    data = dataclasses.replace(cfg.data, tokenizer=cfg.data.tokenizer or teacher.path)
    if "correct" in plan.stages:
        teacher = correct_teacher(cfg, teacher, data, out, ledger)
    scores_dir = out / "importance"
    if "importance" in plan.stages:
        score_importance(cfg, plan, teacher, data, scores_dir, ledger)

    pruned, distilled = {}, {}
    for target in plan.targets:
        if target.params is not None and "search" in plan.stages:
            pruned[target.name] = search_target(cfg, target, teacher, data, scores_dir, out, ledger)
        elif target.shape is not None and "prune" in plan.stages:
            pruned[target.name] = prune_target(cfg, target, teacher, data, scores_dir, out, ledger)
        if target.name in pruned and "distill" in plan.stages:
            distilled[target.name] = distill_target(cfg, target, teacher, pruned[target.name], data, out, ledger)
    models = [teacher, *pruned.values(), *distilled.values()]
    rows = []
    if "eval" in plan.stages:
        rows = evaluate_models(cfg, models, data, out, ledger)
    summary = {"teacher": teacher.path, "targets": [dataclasses.asdict(t) for t in plan.targets],
               "stages": plan.stages, "models": rows,
               "stages_skipped": ledger.skipped, "stage_seconds": ledger.seconds,
               "world_size": gang.world_size}
    if gang.rank == 0:
        if "report" in plan.stages and rows:
            summary["report"] = str(report.write_report(out, rows, cfg.logger, cfg.eval.sample_prompt).resolve())
        write_json_atomic(out / "summary.json", summary)
    gang.barrier()
    summary["table"] = report.format_table(rows) if rows else ""
    summary["samples"] = report.samples(rows, cfg.eval.sample_prompt, kinds=("teacher", "distilled"))
    return summary


def pretrain_teacher(cfg, out: Path, ledger: Ledger) -> Model:
    """The teacher: model.path as given, or the embedded one pretrained here on data.*."""
    if cfg.model.path:
        return Model("teacher", "teacher", cfg.model.path, spec_key(checkpoint_identity(cfg.model.path)))
    key = spec_key("pretrain", cfg.model, cfg.data, cfg.pretrain, cfg.seed)
    return _train_teacher(cfg, ledger, "teacher", "embedded", out / "teacher" / f"embedded-{key}", key, cfg.model,
                          cfg.data, cfg.pretrain)


def correct_teacher(cfg, teacher: Model, data, out: Path, ledger: Ledger) -> Model:
    """Teacher correction (arXiv 2408.11796 section 3.1): continued LM training of the teacher on
    the distillation data, so its distribution matches what the student will see."""
    key = spec_key("correct", teacher.key, data, cfg.correct, cfg.seed)
    return _train_teacher(cfg, ledger, "correct", "teacher", out / "correct" / f"teacher-{key}", key,
                          ModelConfig(name="teacher", path=teacher.path), data, cfg.correct)


def _train_teacher(cfg, ledger: Ledger, stage: str, label: str, run: Path, key: str, model, data, train) -> Model:
    from minitron.train.job import run_training_job

    # A copy of `train`: the job derives an unset micro batch in it, which must not leak into the
    # pipeline's config, and so into the keys of later stages.
    job = TrainJobConfig(output_dir=str(run), seed=cfg.seed, resume="auto", model=model, data=data,
                         train=dataclasses.replace(train), deepspeed=cfg.deepspeed, logger=NO_LOGGER, export=cfg.export)
    ledger.run(stage, label, run / "summary.json", stage, lambda: run_training_job(job, _yaml(job)))
    return Model("teacher", "teacher", str((run / "model").resolve()), key, str(run))


def _prune_job(cfg, teacher: Model, data, scores_dir: Path, output_dir: str, shape=None) -> PruneJobConfig:
    prune = dataclasses.replace(cfg.prune, scores_dir=str(scores_dir))
    if shape is not None:
        prune = dataclasses.replace(prune, export=dataclasses.replace(cfg.prune.export, **shape.export_keys()))
    return PruneJobConfig(output_dir=output_dir, seed=cfg.seed, model=ModelConfig(name="teacher", path=teacher.path),
                          data=data, prune=prune, deepspeed=cfg.deepspeed, logger=NO_LOGGER)


def score_importance(cfg, plan: PipelinePlan, teacher: Model, data, scores_dir: Path, ledger: Ledger) -> None:
    """The calibration pass, once for every target: the prune and search stages read the same
    score cache (minitron/prune/scores.py), with the depth losses each shape target needs."""
    from minitron.models.adapters import adapter_for
    from minitron.models.build import DTYPES
    from minitron.prune import scores
    from minitron.prune.job import check_shardable, scoring_teacher
    from minitron.prune.shape import teacher_shape

    # Not keyed by the targets: a new target's prune stage adds whatever depth losses it lacks.
    key = spec_key("importance", teacher.key, data, cfg.prune.calibration, cfg.prune.importance, cfg.prune.depth,
                   cfg.prune.precision, cfg.seed)
    marker = scores_dir / f"stage-{key}.json"
    gang = ledger.gang

    def work():
        job = _prune_job(cfg, teacher, data, scores_dir, str(scores_dir / "unused"))
        teacher_cfg = resolve_hf_config(job.model, vocab_size=0)
        shape = teacher_shape(teacher_cfg)
        blocks = [scores.depth_block(shape, t.shape, cfg.prune.depth) for t in plan.targets if t.shape is not None]
        packed = build_or_load(data, gang, cfg.seed)
        check_shardable(job.model.path, teacher_cfg, job.deepspeed)
        model = scoring_teacher(job.model, teacher_cfg, cfg.seed, DTYPES[cfg.prune.precision], job.deepspeed, gang)
        imp = scores.load_or_score(job, model, adapter_for(teacher_cfg), packed, gang, gang.device, blocks)
        release(model)
        if gang.rank == 0:
            write_json_atomic(marker, {"scores": str(imp.path), "teacher": teacher.path,
                                       "calibration_seconds": imp.calibration_seconds})
        gang.barrier()

    ledger.run("importance", "teacher", marker, "importance", work)


def prune_target(cfg, target: Target, teacher: Model, data, scores_dir, out: Path, ledger: Ledger) -> Model:
    from minitron.prune.job import run_prune_job

    key = spec_key("prune", teacher.key, data, cfg.prune, target.shape.as_dict(), cfg.seed)
    run = out / "prune" / f"{target.name}-{key}"
    job = _prune_job(cfg, teacher, data, scores_dir, str(run), target.shape)
    ledger.run("prune", target.name, run / "summary.json", f"prune/{target.name}",
               lambda: run_prune_job(job, _yaml(job)))
    return Model(target.name, "pruned", str(run.resolve()), key, str(run))


def search_target(cfg, target: Target, teacher: Model, data, scores_dir, out: Path, ledger: Ledger) -> Model:
    """A budget target: minitron-search's job picks the shape; its winner is the pruned student."""
    from minitron.search.job import run_search_job

    key = spec_key("search", teacher.key, data, cfg.prune, cfg.search, cfg.search_steps, cfg.distill, cfg.train,
                   target.params, cfg.seed)
    run = out / "search" / f"{target.name}-{key}"
    job = search_config(cfg, target, teacher.path, data, str(scores_dir), str(run))
    ledger.run("search", target.name, run / "summary.json", f"search/{target.name}",
               lambda: run_search_job(job, _yaml(job)))
    return Model(target.name, "pruned", str((run / "winner").resolve()), key, str(run))


def distill_target(cfg, target: Target, teacher: Model, student: Model, data, out: Path, ledger: Ledger) -> Model:
    from minitron.distill.job import run_distill_job

    key = spec_key("distill", teacher.key, student.key, data, cfg.distill, cfg.train, cfg.seed)
    run = out / "distill" / f"{target.name}-{key}"
    job = DistillJobConfig(output_dir=str(run), seed=cfg.seed, resume="auto",
                           teacher=TeacherConfig(name="teacher", path=teacher.path, offload=cfg.teacher.offload),
                           student=ModelConfig(name="student", path=student.path), data=data,
                           train=dataclasses.replace(cfg.train),  # a copy, as in _train_teacher
                           deepspeed=cfg.deepspeed, logger=NO_LOGGER, distill=cfg.distill, export=cfg.export)
    ledger.run("distill", target.name, run / "summary.json", f"distill/{target.name}",
               lambda: run_distill_job(job, _yaml(job)))
    return Model(target.name, "distilled", str((run / "model").resolve()), key, str(run))


def evaluate_models(cfg, models, data, out: Path, ledger: Ledger) -> list:
    """Every model on the same validation blocks (and lm-eval tasks): one row each for the report."""
    gang, packed, rows = ledger.gang, None, []
    for m in models:
        key = spec_key("eval", m.key, data, cfg.eval, cfg.seed)
        summary = out / "eval" / f"{m.label}-{m.kind}-{key}" / "summary.json"

        def work():
            nonlocal packed
            packed = packed or build_or_load(data, gang, cfg.seed)
            model_cfg = ModelConfig(name=m.label, path=m.path)
            model = build_model(model_cfg, resolve_hf_config(model_cfg, vocab_size=0), seed=cfg.seed)
            result = evaluate_model(model.to(gang.device).eval(), packed.tokenizer(), packed.val, cfg.eval, gang,
                                    gang.device, cfg.seed)
            if gang.rank == 0:
                summary.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(summary, {**result, "model": m.path})
            gang.barrier()

        ledger.run("eval", f"{m.label} ({m.kind})", summary, f"eval/{m.label}-{m.kind}", work)
        rows.append({"name": m.label, "kind": m.kind, "path": m.path, "run_dir": m.run_dir,
                     **json.loads(summary.read_text())})
    return rows
