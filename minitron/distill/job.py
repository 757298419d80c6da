"""The distillation job: check every input that needs no weights (paths, tokenizers, layer
pairs, widths), build the frozen teacher and the student, run the one training loop with the
distillation loss, and export the student alone.
"""
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Tuple

from minitron.checks import check_train_config
from minitron.config import ConfigError, DistillJobConfig
from minitron.data.corpus import check_source
from minitron.data.packing import digest_memo_dir
from minitron.data.sampler import BlockSampler
from minitron.data.tokenizer import check_tokenizer_files, load_tokenizer
from minitron.distributed.engine import deepspeed_config, frozen_config, full_parameters, initialize, place_frozen
from minitron.distributed.gang import world_size_from_env
from minitron.distributed.partitions import release, teacher_memory
from minitron.distributed.sharded import build_for_engine, zero3
from minitron.distill import teacher_cache, triton_kl
from minitron.distill.distiller import Distiller, TeacherOutputs
from minitron.distill.hidden import make_projection, resolve_index
from minitron.distill.losses import DIVERGENCES
from minitron.distill.teacher import Teacher, freeze
from minitron.eval.perplexity import evaluate
from minitron.memory import measure
from minitron.models.adapters import ADAPTERS
from minitron.models.build import (DTYPES, check_checkpoint_files, count_params, has_tokenizer,
                                   local_checkpoint, max_positions, resolve_hf_config, weight_files)
from minitron.run import begin_training, export_model, start_run, stop_interrupted, write_json_atomic
from minitron.train import checkpoint, flops
from minitron.train.loop import train_loop
from minitron.train.schedule import build_optimizer, schedule_length
from minitron.train.tracking import make_tracker

log = logging.getLogger(__name__)


def needs_teacher(cfg: DistillJobConfig) -> bool:
    return cfg.distill.logits.divergence != "none" or bool(cfg.distill.intermediate.pairs)


def check_distill_inputs(cfg: DistillJobConfig, world_size: int):
    """Cheap checks, in the order a user would fix them; returns (teacher config or None,
    student config, resolved (student, teacher) hidden-state pairs)."""
    check_train_config(cfg, world_size)
    check_loss_config(cfg)
    if not cfg.student.path:
        raise ConfigError("student.path: set it to the student checkpoint (a minitron-prune output or any "
                          "causal LM sharing the teacher's tokenizer)")
    teacher_cfg = None
    if needs_teacher(cfg):
        if not cfg.teacher.path:
            raise ConfigError("teacher.path: set it to the teacher's Hugging Face checkpoint directory")
        teacher_cfg = resolve_hf_config(cfg.teacher, vocab_size=0, key="teacher")
        cfg.teacher.path = local_checkpoint(cfg.teacher.path, key="teacher")
    student_cfg = resolve_hf_config(cfg.student, vocab_size=0, key="student")
    for key, hf in (("teacher", teacher_cfg), ("student", student_cfg)):
        if hf is not None and hf.model_type not in ADAPTERS:
            raise ConfigError(f"{key}.path: model type {hf.model_type!r} is not supported by the fused logit loss "
                              f"(logits = lm_head(final hidden state), soft-capped or not); "
                              f"supported: {', '.join(sorted(ADAPTERS))}")
    cfg.student.path = local_checkpoint(cfg.student.path, key="student")
    if cfg.student.init == "pretrained" and not weight_files(cfg.student.path):
        raise ConfigError(f"student.path: {cfg.student.path} has a config.json but no weights "
                          "(*.safetensors, *.bin); set student.init=random to train it from scratch")
    if teacher_cfg is not None and not weight_files(cfg.teacher.path):
        raise ConfigError(f"teacher.path: {cfg.teacher.path} has a config.json but no weights (*.safetensors, *.bin)")
    if teacher_cfg is not None:
        check_checkpoint_files(cfg.teacher, "teacher")
    check_checkpoint_files(cfg.student, "student")
    for key, hf in (("teacher", teacher_cfg), ("student", student_cfg)):
        if hf is not None and cfg.data.seq_len > max_positions(hf):
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the {key}'s maximum positions "
                              f"({max_positions(hf)})")
    if teacher_cfg is not None:
        if cfg.distill.logits.top_k > teacher_cfg.vocab_size:
            raise ConfigError(f"distill.logits.top_k: {cfg.distill.logits.top_k} is above the teacher's vocabulary "
                              f"of {teacher_cfg.vocab_size}; use 0 for all tokens")
        student_params, teacher_params = count_params(student_cfg), count_params(teacher_cfg)
        if student_params > teacher_params:
            raise ConfigError(f"student.path: the student ({student_params:,} parameters) is larger than the teacher "
                              f"({teacher_params:,}); swap teacher.path and student.path?")
    pairs = _resolve_pairs(cfg, teacher_cfg, student_cfg)
    _check_tokenizers(cfg)
    check_source(cfg.data)
    return teacher_cfg, student_cfg, pairs


def check_loss_config(cfg: DistillJobConfig) -> None:
    lg, it = cfg.distill.logits, cfg.distill.intermediate
    if lg.divergence not in (*DIVERGENCES, "none"):
        raise ConfigError(f"distill.logits.divergence: must be one of {', '.join(DIVERGENCES)}, none; "
                          f"got {lg.divergence!r}")
    if lg.temperature <= 0:
        raise ConfigError(f"distill.logits.temperature: must be positive, got {lg.temperature}")
    if lg.top_k < 0:
        raise ConfigError(f"distill.logits.top_k: must be 0 (all tokens) or positive, got {lg.top_k}")
    if not 0 < lg.beta < 1:
        raise ConfigError(f"distill.logits.beta: must be in (0, 1), got {lg.beta}")
    if lg.ce_weight < 0:
        raise ConfigError(f"distill.logits.ce_weight: must be at least 0, got {lg.ce_weight}")
    if lg.divergence == "none" and not lg.ce_weight:
        raise ConfigError("distill.logits.ce_weight: with divergence=none it must be positive, or nothing trains")
    if lg.chunk_tokens < 1:
        raise ConfigError(f"distill.logits.chunk_tokens: must be at least 1, got {lg.chunk_tokens}")
    if lg.kernel not in ("auto", "torch", "triton"):
        raise ConfigError(f"distill.logits.kernel: must be auto, torch or triton, got {lg.kernel!r}")
    if lg.kernel == "triton" and not triton_kl.available():
        raise ConfigError("distill.logits.kernel: triton is not installed (pip install triton, on a GPU machine)")
    d = cfg.distill
    if d.teacher_cache:
        if lg.divergence == "none":
            raise ConfigError("distill.teacher_cache: there is no teacher term to cache (distill.logits.divergence "
                              "is none)")
        if it.pairs:
            raise ConfigError("distill.teacher_cache: it keeps logits only, and distill.intermediate.pairs needs "
                              "the teacher's hidden states; use one or the other")
        if d.teacher_cache_k < 1:
            raise ConfigError(f"distill.teacher_cache_k: must be at least 1, got {d.teacher_cache_k}")
        if lg.top_k > d.teacher_cache_k:
            raise ConfigError(f"distill.logits.top_k: {lg.top_k} is more than the cache keeps "
                              f"(distill.teacher_cache_k={d.teacher_cache_k})")
        if d.teacher_cache_dtype not in teacher_cache.CACHE_DTYPES:
            raise ConfigError(f"distill.teacher_cache_dtype: must be one of {', '.join(teacher_cache.CACHE_DTYPES)}, "
                              f"got {d.teacher_cache_dtype!r}")
    if it.loss not in ("cosine", "mse"):
        raise ConfigError(f"distill.intermediate.loss: must be cosine or mse, got {it.loss!r}")
    if it.weight is not None and it.weight < 0:
        raise ConfigError(f"distill.intermediate.weight: must be at least 0 or null (dynamic), got {it.weight}")
    if cfg.student.init not in ("pretrained", "random"):
        raise ConfigError(f"student.init: must be pretrained or random, got {cfg.student.init!r}")


def _resolve_pairs(cfg, teacher_cfg, student_cfg) -> List[Tuple[int, int]]:
    it = cfg.distill.intermediate
    pairs = []
    for pair in it.pairs:
        if len(pair) != 2:
            raise ConfigError("distill.intermediate.pairs: each entry is [student_index, teacher_index], "
                              f"got {list(pair)}")
        resolved = []
        for who, index, hf in (("student", pair[0], student_cfg), ("teacher", pair[1], teacher_cfg)):
            num_layers = hf.num_hidden_layers
            try:
                resolved.append(resolve_index(index, num_layers))
            except IndexError:
                raise ConfigError(f"distill.intermediate.pairs: {who} index {index} is out of range for "
                                  f"{num_layers} layers (valid: {-num_layers - 1}..{num_layers})") from None
        pairs.append(tuple(resolved))
    if pairs and student_cfg.hidden_size != teacher_cfg.hidden_size and not it.projection:
        raise ConfigError(f"distill.intermediate.projection: the student's width {student_cfg.hidden_size} differs "
                          f"from the teacher's {teacher_cfg.hidden_size}; hidden-state losses need the projection")
    return pairs


def _check_tokenizers(cfg) -> None:
    """The data is tokenised with the teacher's tokenizer (unless data.tokenizer is set); a
    student with a tokenizer of its own must have the same vocabulary."""
    owner = cfg.teacher.path if needs_teacher(cfg) else cfg.student.path
    if not cfg.data.tokenizer:
        key = "teacher" if needs_teacher(cfg) else "student"
        if not has_tokenizer(owner):
            raise ConfigError(f"data.tokenizer: {key}.path {owner} has no tokenizer; set data.tokenizer")
        cfg.data.tokenizer = owner
    if needs_teacher(cfg) and has_tokenizer(cfg.student.path):
        check_tokenizer_files(cfg.student.path, "student.path")
        from transformers import AutoTokenizer

        teacher_vocab = load_tokenizer(cfg.data.tokenizer).get_vocab()  # a ConfigError naming data.tokenizer
        try:
            student_vocab = AutoTokenizer.from_pretrained(cfg.student.path, trust_remote_code=False).get_vocab()
        except (OSError, ValueError) as e:
            raise ConfigError(f"student.path: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
        if teacher_vocab != student_vocab:
            differ = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
            raise ConfigError(f"student.path: its tokenizer differs from the teacher's ({len(student_vocab)} vs "
                              f"{len(teacher_vocab)} tokens, {differ} entries differ); distillation needs one "
                              "shared tokenizer")


def run_distill_job(cfg: DistillJobConfig, config_yaml: str) -> dict:
    teacher_cfg, student_cfg, pairs = check_distill_inputs(cfg, world_size_from_env())
    gang, out, data = start_run(cfg)
    tokenizer = data.tokenizer()
    vocab = len(tokenizer)
    for key, hf in (("teacher", teacher_cfg), ("student", student_cfg)):
        if hf is not None and vocab > hf.vocab_size:
            raise ConfigError(f"data.tokenizer: {vocab} tokens do not fit the {key}'s vocabulary of {hf.vocab_size}")
    dtype = DTYPES[cfg.train.precision]
    world = gang.world_size
    ds_config = deepspeed_config(cfg.train, cfg.deepspeed, world)

    memory_mark = measure.reset_peak(gang.device)
    student = build_for_engine(cfg.student, student_cfg, cfg.seed, dtype, ds_config, "student")
    if cfg.train.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    projection = None
    if pairs and student_cfg.hidden_size != teacher_cfg.hidden_size:
        projection = make_projection(student_cfg.hidden_size, teacher_cfg.hidden_size,
                                     _kept_hidden(cfg.student.path, teacher_cfg.hidden_size), seed=cfg.seed).to(dtype)
    it = cfg.distill.intermediate
    distiller = Distiller(student, cfg.distill.logits, vocab, cfg.distill.logits.chunk_tokens, pairs, it.loss,
                          projection, it.weight)
    optimizer, scheduler = build_optimizer(distiller, cfg.train)
    engine = initialize(distiller, optimizer, scheduler, ds_config)
    device = engine.device

    teacher, teacher_info, cache = None, {}, None
    if teacher_cfg is not None and cfg.distill.teacher_cache:
        cache, teacher_info = cached_teacher(cfg, teacher_cfg, dtype, ds_config, data, vocab, gang, device)
    elif teacher_cfg is not None:
        teacher, teacher_info = load_teacher(cfg, teacher_cfg, pairs, dtype, ds_config, gang, device)
        teacher_info["teacher_val_loss"] = evaluate(teacher.model, data.val, cfg.train.micro_batch_size, gang,
                                                    device, cfg.train.eval_blocks)
    if teacher_cfg is not None:
        teacher_info["teacher_val_ppl"] = math.exp(min(teacher_info["teacher_val_loss"], 50.0))

    ckpt_root = out / "checkpoints"
    start_step = checkpoint.resume(engine, ckpt_root, cfg.resume, gang)
    begin_training(out, config_yaml, gang)

    student_params = count_params(student_cfg)
    tracker = make_tracker(cfg.logger, out, {"student_params": student_params, "preset": cfg.distill.name,
                                             **teacher_info}, gang.rank, resumed_at=start_step)
    sampler = BlockSampler(data.train, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                           gang.rank, world, cfg.seed)
    result = train_loop(
        engine, distillation_loss(teacher, cache), sampler, data.val, cfg.train, gang, tracker, start_step,
        save_checkpoint=lambda step: checkpoint.save(engine, ckpt_root, step, gang, cfg.train.keep_checkpoints),
        device=device, eval_model=distiller.student)
    if result.interrupted:
        stop_interrupted(result, out, ckpt_root, cfg.train.max_steps, tracker, gang)

    per_token = flops.flops_per_token(cfg.data.seq_len, student_params, student_cfg,
                                      teacher_info.get("teacher_params", 0), teacher_cfg)
    summary = {
        "val_loss": result.val_loss,
        "val_ppl": math.exp(min(result.val_loss, 50.0)),
        "train_loss": result.train_loss,
        **{f"{k}_loss" if k in ("kd", "ce") else k: v for k, v in result.last_metrics.items()},
        **teacher_info,
        "student_params": student_params,
        "tokens_seen": result.tokens_seen,
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "mfu": flops.mfu(result.tokens_per_s, per_token, cfg.train.precision, world),
        "world_size": world,
        "preset": cfg.distill.name,
        "attn_implementation": student.config._attn_implementation,
        "output_model": str((out / "model").resolve()),
        "memory": measure.per_rank(gang, memory_mark, device),
    }
    manifest = {"teacher": cfg.teacher.path if teacher is not None else None, "student": cfg.student.path,
                "student_init": cfg.student.init, "preset": cfg.distill.name,
                "distill": asdict(cfg.distill),
                "tokens_seen": result.tokens_seen, "steps": result.steps, "final": summary}
    extra_files = {"distill.json": json.dumps(manifest, indent=2) + "\n"}
    pruning = Path(cfg.student.path) / "pruning.json"
    if pruning.is_file() and cfg.student.init == "pretrained":  # a random init owes nothing to pruning
        extra_files["pruning.json"] = pruning.read_text()
    export_model(engine, tokenizer, out / "model", gang, cfg.export.max_shard_size, model=distiller.student,
                 extra_files=extra_files)
    tracker.log({"final/val_loss": summary["val_loss"], "final/val_ppl": summary["val_ppl"],
                 **({"final/mfu": summary["mfu"]} if summary["mfu"] is not None else {})}, step=result.steps)
    tracker.finish()
    if gang.rank == 0:
        write_json_atomic(out / "summary.json", summary)
    checkpoint.tidy_finished(ckpt_root, cfg.train.keep_checkpoints,
                             result.steps < schedule_length(cfg.train), gang)
    return summary


def load_teacher(cfg, teacher_cfg, pairs, dtype, ds_config, gang, device):
    """The frozen teacher, replicated or (ZeRO-3) sharded, and what it costs each rank."""
    frozen = frozen_config(ds_config, cfg.teacher.offload)
    model = freeze(build_for_engine(cfg.teacher, teacher_cfg, cfg.seed, dtype, frozen, "teacher"))
    run, model = place_frozen(model, frozen, device)
    info = teacher_memory(model, gang)
    where = "replicated"
    if zero3(ds_config):
        where = "ZeRO-3 shards" + (" in CPU memory" if cfg.teacher.offload == "cpu" else "")
    log.info("teacher: %s parameters, %.3f GiB on each rank (%s)", f"{info['teacher_params']:,}",
             info["teacher_bytes_per_rank"][gang.rank] / 2**30, where)
    return Teacher(model, run, sorted({t for _, t in pairs}), full_parameters), info


def cached_teacher(cfg, teacher_cfg, dtype, ds_config, data, vocab: int, gang, device):
    """(the teacher cache, teacher_info) with every block this run reads cached: the teacher is
    loaded only when some are missing (or its validation loss is), fills them, and is released
    before training, which then runs without it."""
    from minitron.prune.scores import teacher_hash

    d = cfg.distill
    content = gang.broadcast_object(
        teacher_hash(cfg.teacher.path, digest_memo_dir(cfg.data)) if gang.rank == 0 else None)
    cache = teacher_cache.TeacherCache(teacher_cache.cache_root(data.cache_dir, content, d.teacher_cache_k,
                                                                d.teacher_cache_dtype), d.teacher_cache_k,
                                       d.teacher_cache_dtype)
    sampler = BlockSampler(data.train, cfg.train.global_batch_size, cfg.train.micro_batch_size, gang.rank,
                           gang.world_size, cfg.seed)
    # Rank 0's view for all: another rank could otherwise look after a fast rank's segment landed.
    todo, val_loss = gang.broadcast_object(
        (cache.missing(data.train, sampler.blocks_read(cfg.train.max_steps)),
         cache.teacher_val_loss(cfg.train.eval_blocks)) if gang.rank == 0 else None)
    info = {"teacher_params": count_params(teacher_cfg), "teacher_cache": str(cache.root),
            "teacher_cache_filled_blocks": len(todo)}
    if len(todo) or val_loss is None:
        teacher, memory = load_teacher(cfg, teacher_cfg, [], dtype, ds_config, gang, device)
        info.update(memory)
        if val_loss is None:
            val_loss = evaluate(teacher.model, data.val, cfg.train.micro_batch_size, gang, device,
                                cfg.train.eval_blocks)
        log.info("teacher cache: computing the top-%d logits of %d blocks into %s", d.teacher_cache_k, len(todo),
                 cache.root)
        teacher_cache.fill(cache, teacher, data.train, todo, cfg.train.micro_batch_size, vocab,
                           d.logits.chunk_tokens, gang, device)
        if gang.rank == 0:
            cache.save_teacher_val_loss(cfg.train.eval_blocks, val_loss)
        release(teacher.model)
    else:
        log.info("teacher cache: every block this run reads is in %s; the teacher is not loaded", cache.root)
    info["teacher_val_loss"] = val_loss
    return cache, info


def distillation_loss(teacher: Optional[Teacher], cache: Optional[teacher_cache.TeacherCache] = None):
    """The loop's loss_fn: the teacher's outputs for the micro-batch (or its cached top-k logits),
    then the student engine's forward (Distiller.forward), which returns (loss, extras)."""
    def loss_fn(engine, input_ids):
        if cache is not None:
            return engine(input_ids, TeacherOutputs(top_k=cache.lookup(input_ids)))
        if teacher is None:
            return engine(input_ids)
        with teacher.outputs(input_ids) as teacher_outputs:
            return engine(input_ids, teacher_outputs)
    return loss_fn


def _kept_hidden(student_path: str, teacher_width: int) -> Optional[list]:
    """kept.hidden from a student pruned from a teacher of this width (its pruning.json)."""
    path = Path(student_path) / "pruning.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("teacher", {}).get("shape", {}).get("hidden_size") != teacher_width:
        return None
    return manifest.get("kept", {}).get("hidden")
