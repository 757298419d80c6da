"""Typed config schemas, registered with Hydra's ConfigStore.

YAML under `conf/` only picks presets and overrides values; every key a user can set is declared
here with a comment on what it means. Checks that need no data or model (cheap) live in
minitron/checks.py, so every entry point can run them before any expensive work.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A user's mistake in the config or inputs; the CLI prints it as one line and exits non-zero.

    The message starts with the config key to fix, e.g. `data.path: no such file: ...`.
    """


@dataclass
class ModelConfig:
    name: str = "small"
    """Preset name (informational; pick presets with `model=<name>`)."""
    path: Optional[str] = None
    """Local Hugging Face checkpoint directory (or hub name); when set the preset shape is ignored."""
    family: str = "llama"
    """transformers `model_type` used to build a model from the shape below."""
    hidden_size: int = 288
    """Width of the residual stream and the embeddings."""
    intermediate_size: int = 768
    """MLP inner width."""
    num_hidden_layers: int = 4
    """Transformer layers."""
    num_attention_heads: int = 6
    """Query heads (head size: hidden_size / num_attention_heads)."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    max_position_embeddings: int = 1024
    """Longest sequence the model takes; data.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies."""
    tie_word_embeddings: bool = False
    """Share one matrix between the input embedding and the output layer (lm_head)."""
    attn_implementation: str = "auto"
    """`auto` picks flash_attention_2 when flash-attn imports and a GPU is present, else sdpa (eager
    for families without SDPA support: Gemma 2)."""
    init: str = "pretrained"
    """pretrained: load the weights at `path`; random: keep its architecture, initialise from `seed`."""
    trust_remote_code: bool = False
    """Let a checkpoint whose config.json names code of its own (`auto_map`) run that code when it
    loads. Off, such a checkpoint is refused before anything of it is imported."""


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher of a distillation: a model, and where its ZeRO-3 partitions live."""
    offload: str = "none"
    """cpu: under ZeRO-3 its parameter partitions stay in CPU memory and each layer is copied to
    the device for its forward pass (a teacher larger than the GPUs' memory, at the cost of the
    copies); none: on the device."""


@dataclass
class TeacherPlacementConfig:
    """Where the frozen teacher of a search's or a pipeline's distillations lives (their teacher
    is model.*): minitron-distill's teacher.offload, under the same key."""
    offload: str = "none"
    """cpu or none, as minitron-distill's teacher.offload (needs deepspeed=zero3)."""


@dataclass
class ExportConfig:
    max_shard_size: str = "50GB"
    """The exported model's safetensors files hold at most this much each (5GB, 500MB, 2GiB or
    bytes), with model.safetensors.index.json past one file; save_pretrained's default."""


@dataclass
class DataSource:
    """One corpus of a blend (`data.sources`); unset keys take data.*'s value."""
    path: Optional[str] = None
    """A file, directory or Megatron prefix, as data.path."""
    name: Optional[str] = None
    """A `datasets` hub name or saved directory, as data.name."""
    weight: float = 1.0
    """Share of the training samples drawn from this source (weights are normalised)."""
    split: Optional[str] = None
    """As data.split, for this source."""
    text_field: Optional[str] = None
    """As data.text_field, for this source."""
    txt_documents: Optional[str] = None
    """As data.txt_documents, for this source."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """A .txt / .jsonl / .json / .parquet file, a directory of them, or the prefix of a Megatron
    .bin/.idx pair. With `name` and `sources` unset too: the embedded corpus."""
    name: Optional[str] = None
    """A `datasets` hub name or a directory written by `Dataset.save_to_disk`."""
    split: str = "train"
    """Split to read from a `datasets` source."""
    text_field: str = "text"
    """Column / JSON key that holds the document text."""
    txt_documents: str = "paragraph"
    """How a .txt file is cut into documents: paragraph (blank lines), line, or file."""
    sources: List[DataSource] = field(default_factory=list)
    """A blend: [{path: ..., weight: ...}, ...] instead of data.path / data.name."""
    val_path: Optional[str] = None
    """Validation data (same formats as `path`); unset: `val_fraction` of the documents."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer directory or name; unset: train a byte-level BPE on the train split."""
    vocab_size: int = 4096
    """Vocabulary size of a trained tokenizer."""
    tokenizer_sample_bytes: int = 100_000_000
    """A trained tokenizer learns from the first this-many characters of the training split."""
    seq_len: int = 256
    """Tokens per packed block (documents are concatenated with EOS between them)."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (by a hash of the document, not its position;
    a Megatron .bin/.idx source holds out its last documents)."""
    max_bytes: Optional[int] = None
    """Read each source until this many characters of text; unset reads all (embedded: 12 MB)."""
    num_proc: Optional[int] = None
    """Processes that tokenise; unset: the CPU cores available (at most 16)."""
    cache_dir: Optional[str] = None
    """Where tokenised data is cached; unset: $MINITRON_CACHE or ~/.cache/minitron."""


@dataclass
class TrainConfig:
    max_steps: int = 250
    """Optimizer steps."""
    schedule_steps: Optional[int] = None
    """Length of the warmup + cosine schedule; unset: max_steps. A run whose max_steps is below it
    is one segment of a longer run: it checkpoints its last step, and a later run with more
    max_steps continues the same schedule from there (the search's successive halving does this)."""
    micro_batch_size: Optional[int] = None
    """Sequences per rank per forward pass; unset: global_batch_size / processes, or the largest
    divisor of it up to 8 (gradient accumulation makes up the rest), so one config runs at any
    process count that divides the global batch."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks; gradient accumulation makes up the rest."""
    lr: float = 2e-3
    """Peak learning rate of AdamW, reached after warmup_steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Steps of linear warmup from near 0 to lr."""
    weight_decay: float = 0.1
    """AdamW's weight decay, on weight matrices only (norms and biases are not decayed)."""
    beta1: float = 0.9
    """AdamW's beta1 (momentum of the gradient average)."""
    beta2: float = 0.95
    """AdamW's beta2 (of the squared-gradient average)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    precision: str = "fp32"
    """fp32 or bf16."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end)."""
    eval_blocks: int = 64
    """Validation blocks used per evaluation (the same blocks every time, whatever the rank count)."""
    save_every: int = 100
    """DeepSpeed checkpoint every N steps (0: never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints stay on disk while the run goes on (2: the newest, and the
    one before should the newest be damaged); once it finishes they are removed (resuming it has
    nothing left to do), except at the end of a segment that a later run continues
    (`schedule_steps`). 0 keeps every checkpoint, also after the run."""
    log_every: int = 1
    """Training loss and throughput to metrics.jsonl (and the logger) every N steps."""
    activation_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest (the trained
    model only: a frozen teacher keeps nothing anyway); about a third more compute."""


@dataclass
class DeepSpeedConfig:
    zero_optimization: Dict[str, Any] = field(default_factory=lambda: {"stage": 0})
    """DeepSpeed's `zero_optimization` section, verbatim."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Any other DeepSpeed config keys, merged over the ones minitron derives from `train`."""


@dataclass
class WandbConfig:
    project: str = "minitron"
    """W&B project of the run."""
    entity: Optional[str] = None
    """W&B team or user; unset: your W&B default."""
    mode: str = "offline"
    """offline (default: needs no network), online, or disabled."""
    name: Optional[str] = None
    """W&B run name; unset: W&B picks one."""


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    """wandb or none."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainJobConfig:
    output_dir: str = "runs/train"
    """Run directory: checkpoints, metrics.jsonl, the trained model (model/) and summary.json."""
    seed: int = 0
    """Model initialisation, data order and a blend's sampling."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output_dir if there is one; never: start fresh."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train: a preset's shape (model=<preset>), or a checkpoint at `model.path`."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    """How the trained model (model/) is written."""


@dataclass
class PruneExportConfig:
    """The student's shape; a key left unset keeps the teacher's value."""
    hidden_size: Optional[int] = None
    """Embedding channels kept (the same in every layer, embeddings and lm_head)."""
    ffn_hidden_size: Optional[int] = None
    """MLP neurons kept per layer (the student's intermediate_size)."""
    num_attention_heads: Optional[int] = None
    """Query heads kept per layer, the same number from each kept KV group."""
    num_key_value_heads: Optional[int] = None
    """Fewer than the teacher's prunes whole KV groups. Unset: the teacher's, except that an MHA
    teacher stays MHA (it follows num_attention_heads)."""
    num_layers: Optional[int] = None
    """Layers kept; which go is decided by prune.depth.*."""
    num_experts: Optional[int] = None
    """Mixture of experts: experts kept per layer (each layer its most important; the router's
    rows follow, and num_experts_per_tok is lowered to it if above)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Mixture of experts: FFN neurons kept in each expert (each expert its own most important)."""


@dataclass
class CalibrationConfig:
    num_samples: int = 1024
    """Training blocks (of data.seq_len tokens) the importance pass reads, drawn by `seed`."""
    micro_batch_size: int = 8
    """Blocks per forward pass; bounds activation memory (block importance keeps every layer's
    hidden states of one micro-batch)."""


@dataclass
class ImportanceConfig:
    seq_agg: str = "mean"
    """How a sample's per-token activations become one number: mean (of |x|), l2 or var."""
    batch_agg: str = "l2"
    """How samples combine: mean, l2 or var (arXiv 2407.14679 found seq=mean, batch=l2 best)."""
    mlp_activation: str = "post"
    """post: the input of down_proj (act(gate) * up); pre: the gate projection before the activation."""
    ranking: str = "importance"
    """importance, or random (an ablation baseline: every ranking is a seeded permutation)."""


@dataclass
class DepthConfig:
    metric: str = "loss"
    """loss: validation LM loss with the layer(s) removed (lower loss = less important);
    block_importance: 1 - cos(input, output) of the layer or block."""
    contiguous: bool = False
    """Drop one contiguous block of layers (arXiv 2408.11796) instead of the individually least
    important ones."""
    eval_blocks: int = 64
    """Validation blocks per loss-when-removed evaluation."""


@dataclass
class PruneConfig:
    export: PruneExportConfig = field(default_factory=PruneExportConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    precision: str = "fp32"
    """dtype of the calibration passes and of the exported student: fp32 or bf16."""
    dry_run: bool = False
    """Only resolve the student's config and parameter count (meta tensors; needs only config.json)."""
    scores_dir: Optional[str] = None
    """Where importance scores are cached for reuse; unset: `importance/` beside output_dir."""


@dataclass
class PruneJobConfig:
    output_dir: str = "runs/prune"
    """The pruned checkpoint with pruning.json and summary.json, moved into place only when complete."""
    seed: int = 0
    """Draws the calibration blocks (and the permutations of prune.importance.ranking=random)."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher: `model.path` is required."""
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """zero3 partitions the teacher over the ranks for calibration (each holds 1/world of it; the
    student is sliced from its files); other stages replicate it on every rank."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """wandb: the summary goes to a W&B run (and metrics.jsonl) beside the pruned model."""


@dataclass
class LogitLossConfig:
    divergence: str = "forward_kl"
    """forward_kl (KL(teacher || student)), reverse_kl, jsd (generalised, see beta) or none."""
    temperature: float = 1.0
    """Both distributions are softened by this temperature."""
    scale_by_t2: bool = False
    """Multiply the divergence by temperature^2 (keeps gradient scale across temperatures)."""
    top_k: int = 0
    """Keep only the teacher's k most likely tokens (both distributions renormalised); 0: all."""
    beta: float = 0.5
    """jsd only: the mixture weight of the teacher, in (0, 1); 0.5 is the Jensen-Shannon divergence."""
    ce_weight: float = 0.0
    """Weight of a next-token cross-entropy term on the student (arXiv 2407.14679 found 0 best)."""
    chunk_tokens: int = 256
    """Tokens per chunk of the fused logit loss: bounds its memory to a few chunk x vocab floats."""
    kernel: str = "auto"
    """Plain forward KL's per-chunk kernel: auto (Triton on a GPU when installed), torch or triton."""


@dataclass
class IntermediateLossConfig:
    pairs: List[List[int]] = field(default_factory=list)
    """[student_index, teacher_index] hidden states to match, indexed like transformers'
    hidden_states (0: embeddings, i: output of layer i, L: final normed; negative from the end)."""
    loss: str = "cosine"
    """cosine (1 - cos per token) or mse."""
    projection: bool = True
    """A learned linear map from student to teacher width when they differ (not exported)."""
    weight: Optional[float] = None
    """Fixed weight of the summed hidden-state losses; null: dynamic, L_logits / L_hidden."""


@dataclass
class DistillConfig:
    name: str = "logits"
    """Preset name (informational; pick presets with `distill=<name>`)."""
    logits: LogitLossConfig = field(default_factory=LogitLossConfig)
    intermediate: IntermediateLossConfig = field(default_factory=IntermediateLossConfig)
    teacher_cache: bool = False
    """Compute the teacher's top-k logits once per training block (kept beside the packed data,
    keyed by the teacher's content, the data and k) and distil from them without running the
    teacher: the divergence is then over the teacher's top-k support, as with logits.top_k. A
    search's candidates share one cache."""
    teacher_cache_k: int = 64
    """Logits kept per token."""
    teacher_cache_dtype: str = "fp16"
    """How they are stored: fp16, bf16 or fp32."""


@dataclass
class DistillJobConfig:
    output_dir: str = "runs/distill"
    """Run directory: checkpoints, metrics.jsonl, the student (model/) and summary.json."""
    seed: int = 0
    """A random student's initialisation, data order and a blend's sampling."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output_dir if there is one; never: start fresh."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher: `teacher.path` (not needed by distill=lm)."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The student: `student.path`, e.g. a minitron-prune output (student.init=random to start over)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The loss (distill=<preset>): logit divergence, cross-entropy weight, hidden-state pairs."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """How the distilled student (model/) is written."""


@dataclass
class PlanConfig:
    device_memory_gb: Optional[float] = None
    """Memory of one device, GiB: the cheapest configuration whose predicted peak fits it is
    recommended (unset: only the table)."""
    processes: Optional[int] = None
    """Processes the run will have (one per GPU); unset: the launcher's, 1 for a plain run."""
    device: str = "gpu"
    """gpu or cpu: what the run trains on (DeepSpeed prefetches gathered layers only on a GPU)."""


@dataclass
class PlanJobConfig(DistillJobConfig):
    """minitron-distill's config (what would run) plus the device to plan for."""
    output_dir: str = "runs/plan"
    """plan.json: every configuration's predicted peak per rank, by component, and the choice."""
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class PrunePlanJobConfig(PruneJobConfig):
    """minitron-prune's config (what would run) plus the device to plan for (minitron-plan prune)."""
    output_dir: str = "runs/plan"
    """plan.json: every configuration's predicted peak per rank, by component, and the choice."""
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class AxisRange:
    """One axis of the search space: the explicit `choices`, or else every multiple of `step` from
    `min` (unset: `min_ratio` x the teacher's value, rounded up) to the teacher's value, which is
    always included (not pruning an axis is always a candidate)."""
    choices: Optional[List[int]] = None
    min_ratio: float = 0.6
    min: Optional[int] = None
    step: int = 64


@dataclass
class SearchSpaceConfig:
    """Defaults follow arXiv 2407.14679 and Model-Optimizer: depth cut by at most 20%, each width
    axis by at most 40%. Query heads come in multiples of the KV heads (GQA groups stay whole), and
    only shapes the existing prune checks accept (transformers can save them) are listed."""
    num_layers: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.8, step=1))
    hidden_size: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.6, step=64))
    ffn_hidden_size: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.6, step=64))
    num_attention_heads: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.6, step=1))
    num_key_value_heads: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=1.0, step=1))
    """Kept whole by default (min_ratio 1); lower min_ratio or give choices to search it."""
    num_experts: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.5, step=1))
    """Mixture-of-experts teachers only: experts per layer (the dense ffn_hidden_size axis is unused)."""
    moe_ffn_hidden_size: AxisRange = field(default_factory=lambda: AxisRange(min_ratio=0.6, step=64))
    """Mixture-of-experts teachers only: neurons per expert."""


@dataclass
class SearchMemoryConfig:
    seq_len: int = 4096
    """Context length of the KV cache counted by search.memory_gb."""
    batch_size: int = 1
    """Sequences in the KV cache counted by search.memory_gb."""


@dataclass
class SearchConfig:
    name: str = "default"
    """Preset name (informational; pick presets with `search=<name>`)."""
    params: Optional[float] = None
    """Budget: total parameters (embeddings counted once when tied)."""
    non_embedding_params: Optional[float] = None
    """Budget: parameters without the input embedding and the (untied) output embedding."""
    memory_gb: Optional[float] = None
    """Budget, GiB (2^30 bytes): weights in the export dtype (prune.precision) plus the KV cache at
    search.memory.seq_len x search.memory.batch_size."""
    memory: SearchMemoryConfig = field(default_factory=SearchMemoryConfig)
    flops_per_token: Optional[float] = None
    """Budget: forward FLOPs per token at search.memory.seq_len (2 per matmul weight, lm_head included,
    plus attention's 4 x layers x heads x head_dim x seq_len; a mixture counts its top-k experts)."""
    active_params: Optional[float] = None
    """Budget, mixture-of-experts teachers: parameters one token uses (its top-k experts')."""
    tolerance: float = 0.05
    """Every budget set must hold within this fraction either side."""
    space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    max_candidates: int = 8
    """At most this many candidates are ranked; when more meet the budgets, a spread of them
    (farthest-point over the shape ratios, from the largest) is taken."""
    halving: bool = True
    """Successive halving: every candidate distils for a fraction of train.max_steps, the better
    half continues, ... the last two reach train.max_steps. false: all distil for train.max_steps
    (the paper's flat protocol)."""
    eval_blocks: int = 64
    """Held-out blocks for the zero-shot scores (LM loss and KL to the teacher)."""
    dry_run: bool = False
    """Only list the candidates with their sizes (needs config.json alone); loads no weights."""
    candidate: Optional[int] = None
    """Only this candidate's work for the current round (a Hydra multirun job: -m
    search.candidate=0,1,...); unset: everything, then the outputs."""


@dataclass
class SearchJobConfig:
    output_dir: str = "runs/search"
    """search.json (.csv, .png), the winner's pruned checkpoint (winner/), candidates/ and summary.json."""
    seed: int = 0
    """Calibration blocks, data order and a blend's sampling."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher: `model.path` is required."""
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Importance, calibration and depth choices (prune.export is the search's to set)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The candidates' distillation loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The candidates' distillation; train.max_steps is each candidate's budget in the flat protocol."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    """The budgets and the space of shapes (search=<preset>)."""
    teacher: TeacherPlacementConfig = field(default_factory=TeacherPlacementConfig)
    """The candidates' frozen teacher (model.*): teacher.offload=cpu keeps its ZeRO-3 partitions in CPU memory."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """The candidates' distilled checkpoints: export.max_shard_size."""


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=list)
    """lm-eval-harness tasks run on the model (needs the `eval` extra): the shipped local
    `python_next_line`, or any installed lm-eval task whose data is available."""
    blocks: int = 64
    """Validation blocks the perplexity is measured on (the same blocks for every model)."""
    micro_batch_size: int = 8
    """Blocks per forward pass of the perplexity."""
    limit: Optional[int] = None
    """At most this many items of each task; unset: all."""
    batch_size: int = 8
    """lm-eval's batch size."""
    sample_prompt: str = "def "
    """The model's greedy continuation of this prompt is kept in summary.json (and shown by
    minitron-eval and the pipeline's report); empty: none."""
    sample_tokens: int = 48
    """Tokens of that continuation (0: none)."""


@dataclass
class EvalJobConfig:
    output_dir: str = "runs/eval"
    """Where summary.json and eval_config.yaml (and the logger's run) are written."""
    seed: int = 0
    """A blend's sampling and lm-eval's sampling."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate: `model.path`, any Hugging Face causal LM checkpoint."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the validation blocks come from (tokenised with the model's own tokenizer)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Accepted like every command's; evaluation replicates the model on every rank."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class TargetConfig:
    """One student of the family: a budget the search picks a shape for, or an explicit shape."""
    name: Optional[str] = None
    """Names its directories and its row in the report; unset: made from the budget or shape."""
    params: Optional[float] = None
    """Budget in parameters: the shape is searched (search.*)."""
    fraction: Optional[float] = None
    """Budget as a fraction of the teacher's parameters (searched), e.g. 0.5."""
    shape: PruneExportConfig = field(default_factory=PruneExportConfig)
    """An explicit shape (prune.export's keys): pruned as given, no search."""


PIPELINE_STAGES = ("correct", "importance", "search", "prune", "distill", "eval", "report")


@dataclass
class PipelineJobConfig:
    output_dir: str = "runs/pipeline"
    """Every stage's runs, report.md with its plots, and summary.json."""
    seed: int = 0
    """Passed to every stage (initialisation, data order, calibration blocks)."""
    log_level: str = "info"
    """minitron's messages at this level and above on the terminal: debug, info, warning or error.
    Other libraries' output (DeepSpeed, transformers, compilers) goes to the run's log file, and
    to the terminal too with `debug`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher: `model.path`; unset: the embedded teacher is pretrained first (pretrain.*)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The distillation data (and the embedded teacher's pretraining data)."""
    targets: List[TargetConfig] = field(default_factory=list)
    """The students: [{fraction: 0.5}, {params: 3e6}, {shape: {num_layers: 4}}, ...]."""
    stages: List[str] = field(default_factory=lambda: [s for s in PIPELINE_STAGES if s != "correct"])
    """Which of correct, importance, search, prune, distill, eval, report run (always in that order);
    add `correct` for teacher correction (arXiv 2408.11796)."""
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    """The embedded teacher's pretraining (no model.path)."""
    correct: TrainConfig = field(default_factory=TrainConfig)
    """Teacher correction: continued LM training of the teacher on data.* before pruning."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Importance, calibration and depth choices (each target's shape is its own)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The search for budget targets (its budget keys come from each target)."""
    search_steps: int = 100
    """Each candidate's distillation budget in a search (the search's train.max_steps)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distillation loss (distill=<preset>), for each target and the search's candidates."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Each target's distillation (and the search candidates', but for max_steps)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """The pipeline's own run (report tables and plots); the stages log to metrics.jsonl."""
    teacher: TeacherPlacementConfig = field(default_factory=TeacherPlacementConfig)
    """The distillations' frozen teacher (model.*, or its corrected copy): teacher.offload=cpu keeps
    its ZeRO-3 partitions in CPU memory. Not part of the stage keys (it moves no number)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Every trained or distilled checkpoint's files (export.max_shard_size); not part of the stage
    keys, so a rerun with another size reuses the finished stages as they were written."""


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    cs.store(name="prune_schema", node=PruneJobConfig)
    cs.store(name="distill_schema", node=DistillJobConfig)
    cs.store(name="search_job_schema", node=SearchJobConfig)
    cs.store(name="eval_schema", node=EvalJobConfig)
    cs.store(name="plan_schema", node=PlanJobConfig)
    cs.store(name="plan_prune_schema", node=PrunePlanJobConfig)
    cs.store(name="pipeline_schema", node=PipelineJobConfig)
    cs.store(group="search", name="search_schema", node=SearchConfig)
    cs.store(group="distill", name="distill_loss_schema", node=DistillConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
