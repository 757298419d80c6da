"""minitron-prune end to end: a plain transformers checkpoint with its manifest, score reuse,
2 processes equal to 1, dry-run parameter counts, and bad input refused before any work."""
import json
import socket
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import PRUNE, compose_job, run_cli
from minitron.config import ConfigError
from minitron.models.adapters import adapter_for
from minitron.models.build import count_params
from minitron.prune.job import check_prune_inputs, run_prune_job
from minitron.prune.shape import Shape
from minitron.search.sizing import Sizer

PRUNE_PY = str(Path(__file__).resolve().parents[2] / "minitron" / "cli" / "prune.py")
SHAPE = ["prune.export.hidden_size=48", "prune.export.ffn_hidden_size=96",
         "prune.export.num_attention_heads=2", "prune.export.num_layers=1"]


def prune_args(teacher, corpus_dir, out, *extra):
    return [f"model.path={teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={out}",
            "prune.calibration.num_samples=24", "prune.calibration.micro_batch_size=4",
            "prune.depth.eval_blocks=8", *extra]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_teacher, corpus_dir):
    root = tmp_path_factory.mktemp("pruned")
    run_cli(prune_args(tiny_teacher, corpus_dir, root / "student", *SHAPE), launcher=PRUNE)
    return root / "student"


def test_output_is_a_plain_checkpoint_with_its_manifest(pruned, tiny_teacher):
    names = {p.name for p in pruned.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json", "summary.json"} <= names
    assert not [p for p in pruned.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    model = AutoModelForCausalLM.from_pretrained(pruned)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers, cfg.head_dim) == (48, 96, 2, 2, 1, 16)
    tok = AutoTokenizer.from_pretrained(pruned)
    ids = model.generate(**tok("def f(", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 5

    manifest = json.loads((pruned / "pruning.json").read_text())
    summary = json.loads((pruned / "summary.json").read_text())
    kept = manifest["kept"]
    assert len(kept["layers"]) == 1 and len(kept["hidden"]) == 48
    assert [len(m) for m in kept["mlp"]] == [96] and [len(h) for h in kept["heads"]] == [2]
    assert sorted(kept["hidden"]) == kept["hidden"] and max(kept["mlp"][0]) < 176
    assert manifest["teacher"]["path"] == str(tiny_teacher.resolve())
    assert len(manifest["teacher"]["content_hash"]) == 32
    assert manifest["calibration"]["num_samples"] == 24
    assert manifest["importance"]["seq_agg"] == "mean" and manifest["importance"]["batch_agg"] == "l2"
    student_params = sum(p.numel() for p in model.parameters())
    assert manifest["student"]["params"] == summary["student_params"] == student_params
    assert summary["teacher_params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_teacher).parameters())
    assert summary["student_val_loss"] > summary["teacher_val_loss"] > 0


def test_dry_run_counts_equal_the_materialised_student(pruned, tiny_teacher, tmp_path):
    run_cli([f"model.path={tiny_teacher}", f"output_dir={tmp_path}", "prune.dry_run=true", *SHAPE],
            launcher=PRUNE)
    dry = json.loads((tmp_path / "summary.json").read_text())
    real = json.loads((pruned / "summary.json").read_text())
    assert dry["student_params"] == real["student_params"]
    assert dry["teacher_params"] == real["teacher_params"]
    assert dry["student_config"]["hidden_size"] == 48


def test_pruning_to_another_shape_reuses_the_scores(pruned, tiny_teacher, corpus_dir):
    out = pruned.parent / "depth_only"
    run_cli(prune_args(tiny_teacher, corpus_dir, out, "prune.export.num_layers=1"), launcher=PRUNE)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_reused"] is True
    assert len(list((pruned.parent / "importance").glob("*.pt"))) == 1
    first = json.loads((pruned / "pruning.json").read_text())["kept"]
    second = json.loads((out / "pruning.json").read_text())["kept"]
    assert second["layers"] == first["layers"]  # same scores, same depth choice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_scores(tiny_teacher, corpus_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_process_scores")
    run_cli(prune_args(tiny_teacher, corpus_dir, root / "out", *TWO_RANK_EXTRA), launcher=PRUNE)
    return root


# 9 calibration blocks in micro-batches of 4: 5 on rank 0 (2 passes), 4 on rank 1 (1 pass; with a
# sharded teacher it joins rank 0's second pass without its hooks).
TWO_RANK_EXTRA = ["prune.calibration.num_samples=9", "prune.export.ffn_hidden_size=88", "prune.export.num_layers=1"]
# ZeRO-3 with every parameter partitioned (by default small ones stay whole on each rank).
SHARDED = ["deepspeed=zero3", "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "zero3"])
def test_two_processes_score_like_one(tiny_teacher, corpus_dir, tmp_path, one_process_scores, sharded):
    """Replicated, or with the teacher ZeRO-3-partitioned over the 2 ranks (each holding half of
    it, gathered layer by layer in the forward passes, the hooks unchanged): the same statistics,
    removal losses, kept indices and exported student as one process."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), PRUNE_PY]
    run_cli(prune_args(tiny_teacher, corpus_dir, tmp_path / "out", *TWO_RANK_EXTRA, *(SHARDED if sharded else [])),
            launcher=torchrun)
    one, two = ([torch.load(p, weights_only=True) for p in (root / "importance").glob("*.pt")][0]
                for root in (one_process_scores, tmp_path))
    assert one["stats"]["samples"].item() == two["stats"]["samples"].item() == 9
    for name, tensor in one["stats"].items():
        torch.testing.assert_close(two["stats"][name], tensor, rtol=1e-5, atol=1e-6)
    for key, loss in one["removal_loss"].items():
        torch.testing.assert_close(two["removal_loss"][key], loss, rtol=1e-6, atol=0)
    kept_one, kept_two = (json.loads((root / "out" / "pruning.json").read_text())["kept"]
                          for root in (one_process_scores, tmp_path))
    assert kept_one == kept_two
    with safe_open(str(one_process_scores / "out" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), rtol=0, atol=0, msg=name)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    held, total = summary["teacher_params_per_rank"], summary["teacher_params"]
    assert total == json.loads((one_process_scores / "out" / "summary.json").read_text())["teacher_params"]
    for rank_held in held:
        assert rank_held == (pytest.approx(total / 2, rel=0.01) if sharded else total)


LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}


@pytest.mark.parametrize("shape, billions", [
    (["prune.export.hidden_size=3072", "prune.export.ffn_hidden_size=9216"], 4.51),  # Llama-3.1-Minitron-4B-Width
    (["prune.export.num_layers=16"], 4.54),  # Llama-3.1-Minitron-4B-Depth
])
def test_dry_run_reproduces_published_minitron_sizes_from_a_config_alone(tmp_path, shape, billions):
    teacher = tmp_path / "llama-3.1-8b"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(LLAMA_31_8B))
    # In-process (the CLI's dry run is tested above): the job the CLI runs, on the composed config.
    run_prune_job(compose_job("prune", f"model.path={teacher}", f"output_dir={tmp_path / 'out'}",
                              "prune.dry_run=true", *shape), config_yaml="")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert round(summary["teacher_params"] / 1e9, 2) == 8.03
    assert round(summary["student_params"] / 1e9, 2) == billions
    assert summary["student_config"]["head_dim"] == 128


# Nemotron-4 15B (arXiv 2402.16819): 3.2B embedding and 12.5B non-embedding parameters.
NEMOTRON_4_15B = {
    "architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "hidden_size": 6144,
    "intermediate_size": 24576, "num_hidden_layers": 32, "num_attention_heads": 48, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 256000, "max_position_embeddings": 4096, "hidden_act": "relu2",
    "partial_rotary_factor": 0.5, "norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# The Minitron models' published shapes (arXiv 2407.14679; the nvidia/Minitron-*-Base model cards):
# width pruned only, KV heads and head_dim kept.
MINITRON = {"8B": {"hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 48},
            "4B": {"hidden_size": 3072, "intermediate_size": 9216, "num_attention_heads": 32}}


def nemotron_config(**shape):
    fields = {k: v for k, v in NEMOTRON_4_15B.items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model("nemotron", **{**fields, **shape})


@pytest.mark.parametrize("name, billions, non_embedding", [("8B", 8.3, 6.2), ("4B", 4.4, 2.8)])
def test_nemotron_dry_run_reproduces_the_minitron_models_from_a_config_alone(tmp_path, name, billions,
                                                                           non_embedding):
    teacher = tmp_path / "nemotron-4-15b"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(NEMOTRON_4_15B))
    shape = MINITRON[name]
    run_prune_job(compose_job("prune", f"model.path={teacher}", f"output_dir={tmp_path / 'out'}",
                              "prune.dry_run=true", f"prune.export.hidden_size={shape['hidden_size']}",
                              f"prune.export.ffn_hidden_size={shape['intermediate_size']}",
                              f"prune.export.num_attention_heads={shape['num_attention_heads']}"), config_yaml="")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    teacher_config = nemotron_config()
    assert summary["teacher_params"] == count_params(teacher_config)
    assert summary["student_params"] == count_params(nemotron_config(**shape))
    embedding = 2 * 256000 * shape["hidden_size"]  # untied input and output embeddings
    assert round(summary["teacher_params"] / 1e9, 1) == 15.6
    assert round((summary["teacher_params"] - 2 * 256000 * 6144) / 1e9, 1) == 12.5
    assert round(summary["student_params"] / 1e9, 1) == billions
    assert round((summary["student_params"] - embedding) / 1e9, 1) == non_embedding
    student = summary["student_config"]
    assert (student["head_dim"], student["num_key_value_heads"]) == (128, 8)
    # The search's sizing, a sum over the adapter's axes, agrees with the meta build.
    sizes = Sizer(teacher_config, adapter_for(teacher_config), "bf16", 4096, 1).sizes(
        Shape(shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], 8, 32))
    assert sizes.params == summary["student_params"]
    assert sizes.non_embedding_params == summary["student_params"] - embedding


def gpt2_config(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}))
    return gpt2


BAD = [
    (lambda t, d, tmp: [f"model.path={t}", "prune.export.ffn_hidden_size=500"],
     "prune.export.ffn_hidden_size: 500 must be between 1 and the teacher's 176"),
    (lambda t, d, tmp: [f"model.path={t}", "prune.export.num_attention_heads=3"],
     "prune.export.num_attention_heads: 3 is not divisible by num_key_value_heads=2"),
    (lambda t, d, tmp: [f"model.path={t}", "prune.calibration.num_samples=0"],
     "prune.calibration.num_samples: the calibration set is empty"),
    (lambda t, d, tmp: [f"model.path={t}", "prune.importance.seq_agg=max"],
     "prune.importance.seq_agg: must be one of mean, l2, var"),
    (lambda t, d, tmp: [f"model.path={t}", "prune.export.hidden_size=50"],
     "prune.export.hidden_size: transformers refuses this llama shape (50 hidden, 4 heads): The hidden size (50) "
     "is not a multiple of the number of attention heads (4)"),
    (lambda t, d, tmp: [f"model.path={gpt2_config(tmp)}"],
     "model.path: model type 'gpt2' has no pruning adapter; "
     "supported: gemma2, gemma3_text, llama, mistral, mixtral, nemotron, phi3, qwen2, qwen3, qwen3_moe"),
    (lambda t, d, tmp: [f"model.path={tmp}"], "model.path: {tmp} is not a Hugging Face checkpoint"),
    (lambda t, d, tmp: [f"model.path={tmp / 'missing'}"], "model.path: no such directory"),
    (lambda t, d, tmp: [], "model.path: set it"),
    (lambda t, d, tmp: [f"model.path={t}", f"data.path={tmp / 'nodata'}"], "data.path: no such file"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_named_before_any_work(tmp_path, tiny_teacher, corpus_dir, overrides, message):
    cfg = compose_job("prune", f"data.path={corpus_dir}", f"output_dir={tmp_path / 'out'}",
                      *overrides(tiny_teacher, corpus_dir, tmp_path))
    with pytest.raises(ConfigError) as err:
        check_prune_inputs(cfg)
    assert str(err.value).startswith(message.format(tmp=tmp_path))


@pytest.mark.parametrize("case", [1, 5])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, tiny_teacher, corpus_dir, case):
    overrides, message = BAD[case]
    out = tmp_path / "out"
    proc = run_cli([f"data.path={corpus_dir}", f"output_dir={out}", *overrides(tiny_teacher, corpus_dir, tmp_path)],
                   launcher=PRUNE, check=False, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {message}")
    assert not out.exists() and not (tmp_path / "importance").exists()


def test_an_unrelated_output_dir_is_not_overwritten(tmp_path, tiny_teacher, corpus_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="^output_dir:"):
        check_prune_inputs(compose_job("prune", f"model.path={tiny_teacher}", f"data.path={corpus_dir}",
                                       f"output_dir={out}"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
