"""Each rank's peak memory for a distillation (teacher + student), predicted from the configs alone
for every ZeRO stage, precision, teacher offload and activation-checkpointing choice; and the
cheapest choice that fits a device.

Arithmetic over parameter counts (models/build.py's meta-device count) and shapes; nothing is
built. The terms and where their constants come from:

- Student model states (weights, gradients, AdamW's two moments, fp32 master copies) follow ZeRO
  (Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1: 16 bytes per parameter in mixed
  precision, the optimizer's and then the gradients' and weights' shares divided by the process
  count at stages 1, 2, 3). Each stage's bytes per parameter is split into what every rank keeps
  whole and what is partitioned over the ranks. On top of ZeRO's figures: DeepSpeed keeps an fp32
  master partition even in fp32 training, a contiguous gradient bucket, and PyTorch's foreach
  AdamW allocates temporaries the size of the parameters it steps. The constants below are
  those figures rounded to what DeepSpeed 0.19 measured on CPU (benchmarks/memory_plan.py, whose
  table is in benchmarks/RESULTS.md).
- Activations saved for the backward pass, per layer and token: Korthikanti et al. 2022
  (arXiv 2205.05198, section 4.1), recounted for a pre-norm decoder with grouped-query SDPA
  attention (no s x s scores are kept) and a gated MLP, without dropout: the two norms' inputs,
  the attention's q, k, v and output, and the MLP's gate, up, activation and product. With
  activation checkpointing only each layer's input stays, plus one layer's while it recomputes.
- The frozen teacher: its weights (1/world of them under ZeRO-3, none on the device when
  offloaded), one gathered layer at a time under ZeRO-3, and its forward pass's working set for
  one layer (nothing is kept for a backward pass).
- The chunked logit loss (distill/fused.py): a few chunk x vocabulary fp32 buffers (both models'
  logits, their log-probabilities, the gradient), never the whole batch's logits.

Pruning (`estimate_prune`) trains nothing: the teacher's weights (whole, or 1/world and one
gathered layer under ZeRO-3), the calibration pass's working set, and afterwards, with the teacher
released, the student it slices and evaluates. The calibration pass keeps every layer boundary's
unit hidden states of one micro-batch in fp32 (prune/importance.py, for block importance) beside
one layer's forward pass; its per-token constant, 6 x hidden + 6 x FFN values, was read from
minitron-prune's own peaks (benchmarks/memory_plan.py --job prune) for 86M-300M teachers, as was
the host memory from_pretrained holds while it loads a replicated teacher.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

BYTES = {"fp32": 4, "bf16": 2}
STAGES = (0, 1, 2, 3)

# Student bytes per parameter: (kept whole on every rank, partitioned over the ranks), by
# (ZeRO stage, precision). ZeRO's 16 (mixed precision: 2 weights + 2 gradients + 12 fp32 master
# and moments; fp32: 4 + 4 + 8) plus DeepSpeed's fp32 partition, gradient bucket and foreach
# AdamW's temporaries (module docstring). fp32 at stage 0 is ZeRO's 16 alone: a one-process run
# skips DeepSpeed's gradient buckets and the fused AdamW makes no temporaries.
STUDENT_STATE_BYTES = {
    (0, "fp32"): (16, 0), (1, "fp32"): (11, 28), (2, "fp32"): (8, 28), (3, "fp32"): (14, 28),
    (0, "bf16"): (33, 0), (1, "bf16"): (6, 26), (2, "bf16"): (4, 26), (3, "bf16"): (9, 26),
}
# On top, at stage 0 with several processes: DeepSpeed's all-reduce copies the gradients into flat
# buckets and back (5.2-5.4 bytes a parameter measured in fp32). In bf16 its optimizer's own flat
# buffers already take that role, and the 33 above covers 2 processes too (0.95-1.00 measured).
STAGE0_ALLREDUCE_BYTES = {"fp32": 5, "bf16": 0}
LOGIT_CHUNK_BUFFERS = 6  # fp32 chunk x vocabulary tensors alive at once in the fused loss
GPU_PREFETCH_ELEMENTS = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default (off on the CPU)
FORWARD_VALUES_PER_TOKEN = (6, 6)  # (x hidden, x FFN): one layer's no-grad forward with the importance hooks
LOSS_CHUNK_TOKENS = 1024  # eval/perplexity.py's chunk of the next-token loss
LOSS_CHUNK_BUFFERS = 3  # the chunk's logits, their fp32 copy and log-softmax
HF_LOAD_HOST_BYTES = 78 * 2**20  # from_pretrained's own memory while loading; 77-79 MiB measured for 86M-300M


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs of a model: from its transformers config and a meta-device count."""
    params: int
    layers: int
    hidden: int
    ffn: int
    kv_dim: int
    vocab: int
    layer_params: int
    """A decoder layer's parameters (the mean over layers: ZeRO-3 gathers one at a time)."""


@dataclass(frozen=True)
class Setup:
    zero_stage: int
    precision: str
    offload: str = "none"  # the teacher's ZeRO-3 partitions: none (on the device) or cpu
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [f"zero{self.zero_stage}", self.precision]
        if self.offload != "none":
            parts.append(f"teacher offload {self.offload}")
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        return ", ".join(parts)

    @property
    def cost(self) -> tuple:
        """Slower first: offloading copies every teacher layer over PCIe each step, checkpointing
        recomputes the student's forward (about a third more compute), higher stages
        communicate more."""
        return (self.offload != "none", self.activation_checkpointing, self.zero_stage)


def facts(hf_config, params: int) -> ModelFacts:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    ffn = getattr(hf_config, "intermediate_size", 0) or 0
    experts_per_token = getattr(hf_config, "num_experts_per_tok", None)
    if experts_per_token:  # a mixture's tokens each pass through their top-k experts
        ffn = experts_per_token * (getattr(hf_config, "moe_intermediate_size", None) or ffn)
    embeddings = hf_config.vocab_size * hf_config.hidden_size * (1 if hf_config.tie_word_embeddings else 2)
    layers = hf_config.num_hidden_layers
    return ModelFacts(params=params, layers=layers, hidden=hf_config.hidden_size, ffn=ffn,
                      kv_dim=kv_heads * head_dim, vocab=hf_config.vocab_size,
                      layer_params=max((params - embeddings) // max(layers, 1), 0))


def estimate(teacher: Optional[ModelFacts], student: ModelFacts, setup: Setup, world_size: int,
             micro_batch_size: int, seq_len: int, chunk_tokens: int, on_gpu: bool) -> Dict[str, float]:
    """Bytes per rank, by component; `device` is their sum on the device, `host` what offloading
    keeps in CPU memory (on the CPU, `on_gpu` false, that is device memory too)."""
    b = BYTES[setup.precision]
    tokens = micro_batch_size * seq_len
    whole, split = STUDENT_STATE_BYTES[(setup.zero_stage, setup.precision)]
    if setup.zero_stage == 0 and world_size > 1:
        whole += STAGE0_ALLREDUCE_BYTES[setup.precision]
    out = {"student_states": student.params * (whole + split / world_size)}

    per_token_layer = 6 * student.hidden + 2 * student.kv_dim + 4 * student.ffn
    if setup.activation_checkpointing:
        kept = student.layers * student.hidden + per_token_layer
    else:
        kept = student.layers * per_token_layer
    out["student_activations"] = tokens * (kept + 3 * student.hidden) * b
    out["logit_loss"] = LOGIT_CHUNK_BUFFERS * min(chunk_tokens, tokens) * student.vocab * 4
    host = 0.0
    if teacher is not None:
        weights = teacher.params * b
        if setup.zero_stage == 3:
            weights /= world_size
            gathered = teacher.layer_params * b
            if on_gpu:
                gathered += GPU_PREFETCH_ELEMENTS * b
            out["teacher_gathered"] = gathered
        if setup.offload == "cpu":
            host, weights = weights, 0.0
        out["teacher_weights"] = weights
        out["teacher_forward"] = tokens * (3 * teacher.hidden + 2 * teacher.ffn) * b
    if not on_gpu and host:  # offloading to the CPU from the CPU moves nothing out of the run's memory
        out["teacher_weights"] += host
        host = 0.0
    out["device"] = sum(out.values())
    out["host"] = host
    return out


def setups() -> List[Setup]:
    """Every choice the planner weighs (offload only with ZeRO-3, as DeepSpeed allows)."""
    out = []
    for p in BYTES:
        for stage in STAGES:
            for offload in (("none", "cpu") if stage == 3 else ("none",)):
                for checkpointing in (False, True):
                    out.append(Setup(stage, p, offload, checkpointing))
    return out


PRUNE_STAGES = (0, 3)  # ZeRO-3 partitions the teacher; every other stage replicates it


def prune_setups() -> List[Setup]:
    """Pruning's choices: the teacher replicated (zero0; stages 1 and 2 are the same for a model
    without optimizer) or ZeRO-3-partitioned, in either precision."""
    return [Setup(stage, p) for p in BYTES for stage in PRUNE_STAGES]


def forward_bytes(facts: ModelFacts, tokens: int, bytes_per_value: int) -> float:
    per_hidden, per_ffn = FORWARD_VALUES_PER_TOKEN
    return tokens * (per_hidden * facts.hidden + per_ffn * facts.ffn) * bytes_per_value


def estimate_prune(teacher: ModelFacts, student: ModelFacts, setup: Setup, world_size: int, micro_batch_size: int,
                   seq_len: int, file_bytes: int, on_gpu: bool) -> Dict[str, float]:
    """Bytes per rank of minitron-prune, by component, as `estimate` gives them. The teacher
    phase (loading, calibration) and the student phase (the sliced student evaluated once the
    teacher is released) do not overlap: `device` is the larger. `file_bytes`: the checkpoint's
    bytes per value; a replicated teacher loaded in another precision is read whole before the
    cast (host memory, the run's own on the CPU)."""
    b = BYTES[setup.precision]
    tokens = micro_batch_size * seq_len
    loss_chunk = LOSS_CHUNK_BUFFERS * min(LOSS_CHUNK_TOKENS, tokens) * teacher.vocab * 4
    boundaries = (teacher.layers + 1) * tokens * teacher.hidden * 4
    out = {"teacher_weights": float(teacher.params * b)}
    if setup.zero_stage == 3:  # loaded tensor by tensor into the partitions: nothing whole on the host
        out["teacher_weights"] /= world_size
        out["teacher_gathered"] = teacher.layer_params * b + (GPU_PREFETCH_ELEMENTS * b if on_gpu else 0)
        loading, cast = 0.0, 0.0
    else:
        loading, cast = HF_LOAD_HOST_BYTES, float(teacher.params * file_bytes if file_bytes != b else 0)
    working = forward_bytes(teacher, tokens, b) + max(boundaries, loss_chunk)  # calibration, then the loss passes
    if on_gpu:
        out["calibration"] = working
        host = loading + cast
    else:  # the cast's copy is freed before the calibration pass; from_pretrained's memory is not
        out["teacher_load"] = loading
        out["calibration_or_cast"] = max(working, cast)
        host = 0.0
    teacher_phase = sum(out.values())
    out["student_weights"] = float(student.params * b)
    out["student_eval"] = forward_bytes(student, tokens, b) + loss_chunk
    out["device"] = max(teacher_phase, out["student_weights"] + out["student_eval"])
    out["host"] = host
    return out
