"""The search job: list the shapes that meet the budgets, score importance once, prune and score
every candidate zero-shot, distil them by successive halving through the distillation job, rank,
and write the winner's pruned checkpoint with the tables and plots.

State lives on disk under `output_dir/candidates/<shape>/` (the pruned checkpoint, zero_shot.json,
the distillation run, one steps_<n>.json per round it finished), written atomically as each piece
finishes: a restarted search, or a multirun job for one candidate, redoes nothing finished.
"""
import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from minitron.checks import check_train_config
from minitron.config import ConfigError, DistillJobConfig, LoggerConfig, SearchJobConfig, TeacherConfig
from minitron.data.packing import build_or_load
from minitron.distributed.gang import init_gang, world_size_from_env
from minitron.distributed.partitions import full_values, release, teacher_memory
from minitron.logs import is_log_file
from minitron.models.adapters import FamilyAdapter, adapter_for, logit_softcap
from minitron.models.build import DTYPES, resolve_hf_config
from minitron.models.weights import SafetensorsWeights, model_weights
from minitron.prune import scores
from minitron.prune.job import (check_prune_options, check_shardable, check_teacher_checkpoint, check_vocab, export,
                                pruning_manifest, scoring_teacher, sharded)
from minitron.prune.shape import MOE_KEYS, Shape, student_config, teacher_shape
from minitron.prune.slicing import prune_model
from minitron.search import ranking, report
from minitron.search.budget import BUDGET_KEYS, within_budgets
from minitron.search.sizing import Sizer, Sizes
from minitron.search.space import AXES, enumerate_shapes, shape_name, spread
from minitron.search.zero_shot import final_hidden_states, zero_shot_scores
from minitron.run import write_json_atomic
from minitron.train.tracking import make_tracker

log = logging.getLogger(__name__)

SPEC = "search_spec.json"


@dataclasses.dataclass
class Plan:
    teacher_config: object  # transformers PretrainedConfig
    adapter: FamilyAdapter
    teacher: Shape
    teacher_sizes: Sizes
    listed: list
    """(shape, sizes) of every candidate meeting the budgets, largest first."""
    chosen: list
    """The candidates ranked: `listed`, or a spread of search.max_candidates of them."""


def plan_search(cfg: SearchJobConfig, teacher_cfg=None) -> Plan:
    """Every check that needs configs alone, and the candidates; loads no weights. `teacher_cfg`:
    the teacher's transformers config when it has no checkpoint yet (the pipeline's embedded one)."""
    if not cfg.model.path and teacher_cfg is None:
        raise ConfigError("model.path: set it to the teacher's Hugging Face checkpoint directory "
                          "(a directory with only config.json is enough for search.dry_run=true)")
    for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers",
                *MOE_KEYS):
        if getattr(cfg.prune.export, key) is not None:
            raise ConfigError(f"prune.export.{key}: the search chooses the shape; leave prune.export unset")
    s = cfg.search
    check_prune_options(cfg.prune, calibrates=False)
    if s.memory.seq_len < 1 or s.memory.batch_size < 1:
        raise ConfigError("search.memory.seq_len: the KV cache's seq_len and batch_size must be at least 1")
    if s.max_candidates < 1:
        raise ConfigError(f"search.max_candidates: must be at least 1, got {s.max_candidates}")
    teacher_cfg = teacher_cfg or resolve_hf_config(cfg.model, vocab_size=0)
    adapter = adapter_for(teacher_cfg)
    teacher = teacher_shape(teacher_cfg)
    shapes = enumerate_shapes(teacher, s.space, teacher_cfg, adapter)
    sizer = Sizer(teacher_cfg, adapter, cfg.prune.precision, s.memory.seq_len, s.memory.batch_size)
    teacher_sizes = sizer.sizes(teacher)
    listed = within_budgets([(shape, sizer.sizes(shape)) for shape in shapes], s, teacher_sizes)
    listed.sort(key=lambda c: (-c[1].params, shape_name(c[0])))
    chosen_shapes = set(spread([shape for shape, _ in listed], teacher, s.max_candidates))
    chosen = [c for c in listed if c[0] in chosen_shapes]
    return Plan(teacher_cfg, adapter, teacher, teacher_sizes, listed, chosen)


def check_run_inputs(cfg: SearchJobConfig, plan: Plan) -> DistillJobConfig:
    """The checks a real (not dry) run adds; returns the candidates' distillation config template."""
    s = cfg.search
    check_prune_options(cfg.prune, calibrates=True)
    if s.eval_blocks < 1:
        raise ConfigError(f"search.eval_blocks: must be at least 1, got {s.eval_blocks}")
    if s.candidate is not None and not 0 <= s.candidate < len(plan.chosen):
        raise ConfigError(f"search.candidate: {s.candidate} is not a candidate index (0..{len(plan.chosen) - 1})")
    ranking.halving_rounds(len(plan.chosen), cfg.train.max_steps, s.halving)
    check_teacher_checkpoint(cfg, plan.teacher_config)
    check_shardable(cfg.model.path, plan.teacher_config, cfg.deepspeed)
    template = DistillJobConfig(
        output_dir="", seed=cfg.seed, resume="auto",
        teacher=TeacherConfig(**{**dataclasses.asdict(cfg.model), "name": "teacher", "offload": cfg.teacher.offload}),
        data=copy.deepcopy(cfg.data), train=dataclasses.replace(cfg.train, schedule_steps=cfg.train.max_steps),
        deepspeed=copy.deepcopy(cfg.deepspeed), logger=LoggerConfig(backend="none"),
        distill=copy.deepcopy(cfg.distill), export=copy.deepcopy(cfg.export))
    template.student = dataclasses.replace(cfg.model, name="student", path=None, init="pretrained")
    from minitron.distill.job import check_loss_config  # imports deepspeed: not for a dry run

    check_train_config(template, world_size_from_env())
    check_loss_config(template)
    _check_output_dir(cfg)
    return template


def _spec(cfg: SearchJobConfig) -> dict:
    """Everything a candidate's results depend on; a search dir holds results of one spec only."""
    spec = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in ("output_dir", "logger", "teacher", "export"):  # where things live, not what they hold
        spec.pop(key)
    spec["search"].pop("candidate")
    spec["search"].pop("dry_run")
    return spec


def _first_difference(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if a != b else None


def _check_output_dir(cfg: SearchJobConfig) -> None:
    out = Path(cfg.output_dir)
    if (out / SPEC).is_file():
        differs = _first_difference(json.loads((out / SPEC).read_text()), json.loads(json.dumps(_spec(cfg))))
        if differs:
            raise ConfigError(f"output_dir: {out} holds a search with another {differs}; its candidates' results "
                              "would not compare, choose a new output_dir")
    elif out.exists() and any(p.name != "multirun" and not is_log_file(p) for p in out.iterdir()):
        raise ConfigError(f"output_dir: {out} exists and is not a minitron search; choose a new directory")


def candidate_rows(plan: Plan) -> List[dict]:
    return [{"index": i, "name": shape_name(shape), **shape.as_dict(), **sizes.as_dict()}
            for i, (shape, sizes) in enumerate(plan.chosen)]


def dry_run(cfg: SearchJobConfig, plan: Plan) -> dict:
    out = Path(cfg.output_dir)
    if (out / SPEC).is_file():
        raise ConfigError(f"output_dir: {out} holds a search; a dry run would overwrite its summary.json, "
                          "choose another directory")
    rows = [{"name": shape_name(shape), **shape.as_dict(), **sizes.as_dict(),
             "chosen": any(shape == c[0] for c in plan.chosen)} for shape, sizes in plan.listed]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "search.json", {"teacher": {**plan.teacher.as_dict(), **plan.teacher_sizes.as_dict()},
                                            "budgets": _budgets(cfg), "candidates": rows})
    report.write_csv(out / "search.csv", rows)
    summary = {"dry_run": True, "num_listed": len(rows), "num_chosen": len(plan.chosen),
               "teacher_params": plan.teacher_sizes.params, "budgets": _budgets(cfg)}
    write_json_atomic(out / "summary.json", summary)
    summary["table"] = report.format_table(rows)
    return summary


def _budgets(cfg) -> dict:
    return {k: getattr(cfg.search, k) for k in BUDGET_KEYS if getattr(cfg.search, k) is not None}


def run_search_job(cfg: SearchJobConfig, config_yaml: str) -> dict:
    plan = plan_search(cfg)
    if cfg.search.dry_run:
        return dry_run(cfg, plan)
    template = check_run_inputs(cfg, plan)
    gang = init_gang()
    out = Path(cfg.output_dir)
    if gang.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / SPEC).is_file():
            write_json_atomic(out / SPEC, _spec(cfg))
        (out / "search_config.yaml").write_text(config_yaml)
    data = build_or_load(cfg.data, gang, cfg.seed)
    tokenizer = data.tokenizer()
    check_vocab(tokenizer, plan.teacher_config)
    rows = candidate_rows(plan)
    mine = [cfg.search.candidate] if cfg.search.candidate is not None else list(range(len(rows)))

    dirs = [out / "candidates" / row["name"] for row in rows]
    todo = gang.broadcast_object([i for i in mine if not (dirs[i] / "zero_shot.json").is_file()])
    if todo:
        score_zero_shot(cfg, plan, data, tokenizer, gang, todo, dirs, config_yaml)
    zero_shot = gang.broadcast_object({i: json.loads((dirs[i] / "zero_shot.json").read_text())
                                       for i in range(len(rows)) if (dirs[i] / "zero_shot.json").is_file()})

    rounds = ranking.halving_rounds(len(rows), cfg.train.max_steps, cfg.search.halving)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    results: Dict[int, List[float]] = {i: [] for i in range(len(rows))}
    alive = list(range(len(rows)))
    for r, (count, steps) in enumerate(rounds):
        if r:
            alive = ranking.survivors({i: results[i][r - 1] for i in alive}, count)
        for i in alive:
            found = gang.broadcast_object(_read_round(dirs[i], steps) if gang.rank == 0 else None)
            if found is None and i in mine:
                log.info("round %d of %d: distilling %s to %d steps", r + 1, len(rounds), rows[i]["name"], steps)
                found = distill_candidate(template, dirs[i], steps, gang)
            if found is not None:
                results[i].append(found["val_loss"])
        waiting = [rows[i]["name"] for i in alive if len(results[i]) <= r]
        if waiting:  # a multirun job for one candidate: the others' jobs finish this round
            log.info("round %d waits for %s; run again once their jobs finish", r + 1, ", ".join(waiting))
            return {"candidate": cfg.search.candidate, "round": r + 1, "waiting_for": waiting}
    if cfg.search.candidate is not None and len(mine) < len(rows):
        return {"candidate": cfg.search.candidate, "round": len(rounds), "waiting_for": []}
    return finish(cfg, plan, rows, dirs, zero_shot, results, rounds, tokens_per_step, gang)


def score_zero_shot(cfg, plan: Plan, data, tokenizer, gang, todo, dirs, config_yaml) -> None:
    """Stage 1 for the candidates in `todo`: importance once (cached), then each pruned from the
    teacher (in memory, or its files when ZeRO-3 partitions it), scored on held-out blocks, and
    exported as minitron-prune writes it."""
    device = gang.device
    dtype = DTYPES[cfg.prune.precision]
    mb, eval_blocks = cfg.prune.calibration.micro_batch_size, cfg.search.eval_blocks
    teacher = scoring_teacher(cfg.model, plan.teacher_config, cfg.seed, dtype, cfg.deepspeed, gang)
    blocks = {scores.depth_block(plan.teacher, shape, cfg.prune.depth) for shape, _ in plan.chosen}
    imp = scores.load_or_score(cfg, teacher, plan.adapter, data, gang, device, blocks)
    teacher_hidden = final_hidden_states(teacher, data.val, mb, gang, device, eval_blocks)
    teacher_params = teacher_memory(teacher, gang)["teacher_params"]
    # A sharded teacher's students are sliced from its files (check_shardable vouched for them).
    weights = SafetensorsWeights(cfg.model.path) if sharded(cfg.deepspeed) else model_weights(teacher)
    head = teacher.get_output_embeddings().weight
    with full_values(head):  # gathered while the candidates' KL to the teacher uses it
        for i in todo:
            shape, sizes = plan.chosen[i]
            kept = scores.kept_for(imp, plan.teacher, shape, cfg.prune, cfg.seed)
            student = prune_model(weights, plan.adapter, kept,
                                  student_config(plan.teacher_config, plan.adapter, shape, kept.layers),
                                  dtype, teacher.config._attn_implementation).to(device)
            zs = zero_shot_scores(student, teacher_hidden, head, len(tokenizer),
                                  data.val, mb, gang, device, eval_blocks, logit_softcap(teacher.config))
            log.info("zero-shot %s: val_loss %.4f, KL %.4f", shape_name(shape), zs["val_loss"], zs["kl"])
            if gang.rank == 0:
                summary = {"teacher_params": teacher_params, "student_params": sizes.params,
                           "teacher_val_loss": imp.teacher_loss(cfg.prune.depth.eval_blocks),
                           "student_val_loss": zs["val_loss"], "student_kl": zs["kl"],
                           "calibration_seconds": imp.calibration_seconds, "scores_reused": imp.reused,
                           "world_size": gang.world_size, "output_model": str((dirs[i] / "pruned").resolve())}
                manifest = pruning_manifest(cfg, imp, data, plan.teacher, shape, kept, teacher_params, sizes.params)
                export(student, tokenizer, dirs[i] / "pruned", {"pruning.json": manifest, "summary.json": summary},
                       config_yaml)
                write_json_atomic(dirs[i] / "zero_shot.json", {
                    "val_loss": zs["val_loss"], "kl": zs["kl"], "teacher_val_loss": summary["teacher_val_loss"],
                    "scores": str(imp.path)})
            gang.barrier()
            del student
    release(teacher)  # before the candidates' distillations load it again


def _read_round(cand_dir: Path, steps: int) -> Optional[dict]:
    path = cand_dir / f"steps_{steps:08d}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def distill_candidate(template: DistillJobConfig, cand_dir: Path, steps: int, gang) -> dict:
    """Distil the candidate up to `steps` through the distillation job, continuing its own run
    (the schedule spans train.max_steps, so each round is a segment of one run)."""
    from minitron.distill.job import run_distill_job

    job = copy.deepcopy(template)
    job.output_dir = str(cand_dir / "distill")
    job.student.path = str(cand_dir / "pruned")
    job.train.max_steps = steps
    summary = run_distill_job(job, OmegaConf.to_yaml(OmegaConf.structured(job)))
    result = {k: summary[k] for k in ("val_loss", "train_loss", "tokens_seen", "steps")}
    if gang.rank == 0:
        write_json_atomic(cand_dir / f"steps_{steps:08d}.json", result)
    gang.barrier()
    return result


def finish(cfg, plan: Plan, rows, dirs, zero_shot, results, rounds, tokens_per_step, gang) -> dict:
    """Rank, then write search.json, search.csv, search.png, W&B, winner/ and summary.json."""
    out = Path(cfg.output_dir)
    order = ranking.final_order(results)
    position = ranking.ranks(order)
    for i, row in enumerate(rows):
        row.update(rank=position[i] + 1, zero_shot_val_loss=zero_shot[i]["val_loss"], zero_shot_kl=zero_shot[i]["kl"],
                   distill={str(steps): results[i][r] for r, (_, steps) in enumerate(rounds) if r < len(results[i])},
                   distill_steps=rounds[len(results[i]) - 1][1], distill_val_loss=results[i][-1])
    taus = {"zero_shot_loss_vs_final": ranking.tau_against(order, {i: zero_shot[i]["val_loss"] for i in order}),
            "zero_shot_kl_vs_final": ranking.tau_against(order, {i: zero_shot[i]["kl"] for i in order})}
    for r, (_, steps) in enumerate(rounds[:-1] if len(rounds) > 1 else []):
        taus[f"round{r + 1}_{steps}_steps_vs_final"] = ranking.tau_against(
            order, {i: results[i][r] for i in order if len(results[i]) > r})
    winner = rows[order[0]]
    tokens = sum(row["distill_steps"] for row in rows) * tokens_per_step
    teacher_loss = zero_shot[order[0]]["teacher_val_loss"]
    summary = {"winner": {k: winner[k] for k in ("name", *AXES, "params", "non_embedding_params", "memory_gb",
                                                 "flops_per_token", "zero_shot_val_loss", "zero_shot_kl",
                                                 "distill_steps", "distill_val_loss")},
               "kendall_tau": taus, "distill_tokens": tokens, "num_candidates": len(rows),
               "num_listed": len(plan.listed), "halving": cfg.search.halving,
               "rounds": [{"candidates": n, "steps": s} for n, s in rounds], "budgets": _budgets(cfg),
               "teacher_params": plan.teacher_sizes.params, "teacher_val_loss": teacher_loss,
               "world_size": gang.world_size, "output_model": str((out / "winner").resolve())}
    if gang.rank == 0:
        ranked = sorted(rows, key=lambda row: row["rank"])
        write_json_atomic(out / "search.json", {"teacher": {**plan.teacher.as_dict(), **plan.teacher_sizes.as_dict()},
                                                "budgets": _budgets(cfg), "rounds": summary["rounds"],
                                                "kendall_tau": taus, "winner": winner["name"], "candidates": ranked})
        report.write_csv(out / "search.csv", ranked)
        report.plot(out / "search.png", ranked, winner["name"], plan.teacher_sizes.params, teacher_loss)
        _copy_winner(dirs[order[0]] / "pruned", out / "winner")
        tracker = make_tracker(cfg.logger, out, {"budgets": _budgets(cfg), "candidates": len(rows)}, gang.rank)
        # The step-0 row first: W&B refuses (and warns about) a step below one it has logged.
        tracker.log({"search/winner_val_loss": winner["distill_val_loss"], "search/distill_tokens": tokens,
                     **{f"search/tau/{k}": v for k, v in taus.items() if v is not None}}, step=0)
        tracker.log_table("search/candidates", report.columns(ranked), report.table_rows(ranked))
        tracker.log_image("search/params_vs_loss", out / "search.png")
        tracker.finish()
        write_json_atomic(out / "summary.json", summary)
        _remove_candidate_checkpoints(dirs)
    gang.barrier()
    summary["table"] = report.format_table(rows)
    return summary


def _remove_candidate_checkpoints(dirs: List[Path]) -> None:
    """The candidates' distillation checkpoints serve only a round still to run; a finished search
    keeps their results (steps_*.json) and the winner, and says what it freed."""
    roots = [d / "distill" / "checkpoints" for d in dirs if (d / "distill" / "checkpoints").is_dir()]
    size = sum(f.stat().st_size for root in roots for f in root.rglob("*") if f.is_file())
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    if roots:
        log.info("removed the checkpoints of %d candidate%s (%.1f MB): the search is finished", len(roots),
                 "" if len(roots) == 1 else "s", size / 1e6)


def _copy_winner(source: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
