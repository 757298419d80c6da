"""What a pipeline run will do, decided from configs alone: which stages run, every target
resolved to a budget or a shape against the teacher's config, and every user mistake found
before the first model is built (a teacher pretraining for minutes must not end in a typo).

Each stage's output directory is named by a hash of everything it depends on (its settings and
the keys of the stages it reads), so a rerun finds finished work, and changing one target's
setting reruns only that target's stages.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from minitron.checks import check_train_config
from minitron.config import (PIPELINE_STAGES, ConfigError, DistillJobConfig, LoggerConfig, PipelineJobConfig,
                             PruneExportConfig, SearchJobConfig, TargetConfig, TeacherConfig)
from minitron.data.corpus import check_source
from minitron.data.tokenizer import check_tokenizer_files
from minitron.distributed.gang import world_size_from_env
from minitron.eval.job import check_eval_options
from minitron.logs import is_log_file
from minitron.models.adapters import adapter_for
from minitron.models.build import (check_checkpoint_files, count_params, has_tokenizer, local_checkpoint, max_positions,
                                   resolve_hf_config, weight_files)
from minitron.prune.job import check_prune_options
from minitron.prune.shape import MOE_KEYS, Shape, check_exportable, resolve_target, teacher_shape
from minitron.search.space import shape_name

SHAPE_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers",
              *MOE_KEYS)


@dataclass
class Target:
    name: str
    params: Optional[float]
    """The budget in parameters (searched), or None for an explicit shape."""
    shape: Optional[Shape]


@dataclass
class PipelinePlan:
    stages: List[str]
    teacher_config: object  # transformers PretrainedConfig (the embedded one's vocab is data.vocab_size)
    teacher_params: int
    targets: List[Target]


def spec_key(*parts) -> str:
    """A short stable hash of JSON-able parts (dataclasses become dicts)."""
    plain = [OmegaConf.to_container(OmegaConf.structured(p)) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:10]


def checkpoint_identity(path: str) -> dict:
    """A teacher given by path is named by its files' sizes and times: cheap for a 70B checkpoint,
    and a retrained teacher in the same directory gets new keys."""
    root = Path(path).resolve()
    files = [root / "config.json", *weight_files(root)]
    return {"path": str(root), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def check_stages(cfg: PipelineJobConfig) -> List[str]:
    stages = list(cfg.stages)
    for name in stages:
        if name not in PIPELINE_STAGES:
            raise ConfigError(f"stages: unknown stage {name!r}; choose from {', '.join(PIPELINE_STAGES)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: a stage is listed twice: {stages}")
    for stage, needs in (("search", "importance"), ("prune", "importance"), ("report", "eval")):
        if stage in stages and needs not in stages:
            raise ConfigError(f"stages: {stage} needs {needs} (list it too)")
    return [s for s in PIPELINE_STAGES if s in stages]


def resolve_targets(cfg: PipelineJobConfig, teacher_config, teacher_params: int, stages: List[str]) -> List[Target]:
    if not cfg.targets and any(s in stages for s in ("search", "prune", "distill")):
        raise ConfigError("targets: list at least one student, e.g. 'targets=[{fraction: 0.5}]'")
    adapter = adapter_for(teacher_config)
    teacher = teacher_shape(teacher_config)
    targets = []
    for i, t in enumerate(cfg.targets):
        targets.append(_resolve_target(cfg, i, t, teacher_config, adapter, teacher, teacher_params, stages))
    for i, a in enumerate(targets):
        for j, b in enumerate(targets[:i]):
            if a.name == b.name:
                raise ConfigError(f"targets: targets[{j}] and targets[{i}] are both named {a.name!r}")
            if (a.params, a.shape) == (b.params, b.shape):
                raise ConfigError(f"targets: targets[{j}] and targets[{i}] are the same student ({a.name}); "
                                  "remove one or change its budget or shape")
    for i, target in enumerate(targets):
        if target.params is not None and "search" in stages:  # some shape must meet the budget
            from minitron.search.job import plan_search

            try:
                plan_search(search_config(cfg, target, model_path=None), teacher_config)
            except ConfigError as e:
                raise ConfigError(f"targets[{i}] ({target.name}): {e}") from None
    return targets


def _resolve_target(cfg, i, t: TargetConfig, teacher_config, adapter, teacher: Shape, teacher_params, stages):
    key = f"targets[{i}]"
    has_shape = any(getattr(t.shape, k) is not None for k in SHAPE_KEYS)
    budgets = [k for k in ("params", "fraction") if getattr(t, k) is not None]
    if has_shape + len(budgets) != 1:
        raise ConfigError(f"{key}: give exactly one of params (a budget), fraction (of the teacher's parameters) "
                          "or shape (explicit prune.export keys)")
    if has_shape:
        try:
            shape = resolve_target(teacher, t.shape)
            check_exportable(teacher_config, adapter, shape)
        except ConfigError as e:
            raise ConfigError(f"{key}.shape: {str(e).removeprefix('prune.export.')}") from None
        if shape == teacher:
            raise ConfigError(f"{key}.shape: this is the teacher's own shape; prune at least one axis")
        if "prune" not in stages and "distill" in stages:
            raise ConfigError(f"stages: distill needs prune for {key} (an explicit shape)")
        return Target(t.name or shape_name(shape), None, shape)
    if t.fraction is not None and not 0 < t.fraction < 1:
        raise ConfigError(f"{key}.fraction: must be between 0 and 1 (a share of the teacher's "
                          f"{teacher_params:,} parameters), got {t.fraction}")
    params = t.params if t.params is not None else t.fraction * teacher_params
    if params >= teacher_params:
        raise ConfigError(f"{key}.params: {params:,.0f} is not below the teacher's {teacher_params:,} parameters")
    if params <= 0:
        raise ConfigError(f"{key}.params: must be positive, got {params}")
    if "search" not in stages and "distill" in stages:
        raise ConfigError(f"stages: distill needs search for {key} (a budget)")
    name = t.name or (f"f{t.fraction:g}" if t.fraction is not None else f"p{params / 1e6:.3g}M")
    return Target(name, float(params), None)


def search_config(cfg: PipelineJobConfig, target: Target, model_path: Optional[str], data=None,
                  scores_dir: Optional[str] = None, output_dir: str = "") -> SearchJobConfig:
    """The search job of a budget target: its candidates distil for search_steps each (flat)."""
    return SearchJobConfig(
        output_dir=output_dir, seed=cfg.seed, model=dataclasses.replace(cfg.model, path=model_path),
        data=data or cfg.data, prune=dataclasses.replace(cfg.prune, export=PruneExportConfig(), scores_dir=scores_dir),
        distill=cfg.distill, train=dataclasses.replace(cfg.train, max_steps=cfg.search_steps, eval_every=0),
        deepspeed=cfg.deepspeed, logger=LoggerConfig(backend="none"),
        search=dataclasses.replace(cfg.search, params=target.params, candidate=None, dry_run=False),
        teacher=cfg.teacher, export=cfg.export)


def plan_pipeline(cfg: PipelineJobConfig) -> PipelinePlan:
    """Every check that needs configs alone, in the order a user would fix them."""
    stages = check_stages(cfg)
    world = world_size_from_env()
    if cfg.search_steps < 1:
        raise ConfigError(f"search_steps: must be at least 1, got {cfg.search_steps}")
    for section in ("pretrain", "correct", "train"):
        try:
            # On a copy: an unset micro batch stays unset in the stage keys (each stage derives
            # it for its process count), so a rerun with another process count reuses the stages.
            check_train_config(_as_train_job(cfg, dataclasses.replace(getattr(cfg, section))), world)
        except ConfigError as e:
            raise ConfigError(f"{section}.{str(e).removeprefix('train.')}" if str(e).startswith("train.")
                              else str(e)) from None
    check_prune_options(cfg.prune, calibrates="importance" in stages)
    check_eval_options(cfg.eval)
    from minitron.distill.job import check_loss_config  # imports deepspeed, as the run will anyway

    check_loss_config(_as_train_job(cfg, cfg.train))
    if cfg.model.path:
        teacher_config = resolve_hf_config(cfg.model, vocab_size=0)
        cfg.model.path = local_checkpoint(cfg.model.path)
        if not weight_files(cfg.model.path):
            raise ConfigError(f"model.path: {cfg.model.path} has a config.json but no weights")
        check_checkpoint_files(cfg.model)
        if not cfg.data.tokenizer and not has_tokenizer(cfg.model.path):
            raise ConfigError(f"data.tokenizer: model.path {cfg.model.path} has no tokenizer; set data.tokenizer")
        check_tokenizer_files(cfg.data.tokenizer or cfg.model.path)
    else:
        teacher_config = resolve_hf_config(cfg.model, vocab_size=cfg.data.vocab_size)
    if cfg.data.seq_len > max_positions(teacher_config):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the teacher's maximum positions "
                          f"({max_positions(teacher_config)})")
    teacher_params = count_params(teacher_config)
    targets = resolve_targets(cfg, teacher_config, teacher_params, stages)
    check_source(cfg.data)
    out = Path(cfg.output_dir)
    if out.is_file():
        raise ConfigError(f"output_dir: {out} is a file; choose a directory")
    if out.is_dir() and any(not is_log_file(p) for p in out.iterdir()) and not (out / "pipeline_config.yaml").is_file():
        raise ConfigError(f"output_dir: {out} exists and is not a minitron pipeline; choose a new directory")
    return PipelinePlan(stages, teacher_config, teacher_params, targets)


def _as_train_job(cfg: PipelineJobConfig, train):
    """A stand-in job config for the train-loop checks (they read train, resume, logger, deepspeed)."""
    return DistillJobConfig(output_dir=cfg.output_dir, train=train, deepspeed=cfg.deepspeed, logger=cfg.logger,
                            distill=cfg.distill, teacher=TeacherConfig(offload=cfg.teacher.offload), export=cfg.export)
