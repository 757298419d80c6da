"""minitron-search end to end on the tiny teacher: every output, halving's rounds, a killed search
restarts without redoing finished candidates, a multirun sweep over candidates, zero-shot scores
against a float64 reference, and bad input refused before any model is loaded."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import compose_job, run_cli
from distributed.test_multiprocess import free_port
from minitron.config import ConfigError
from minitron.distributed.gang import LocalGang
from minitron.search.job import check_run_inputs, plan_search
from minitron.search.zero_shot import final_hidden_states, zero_shot_scores
from prune.random_models import random_model

SEARCH = [sys.executable, "-m", "minitron.cli.search"]
STEPS = 4  # the flat protocol's budget per candidate; halving over 4: 4 x 2 steps, then 2 x 4


def search_args(teacher, corpus_dir, out, *extra):
    return [f"model.path={teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={out}",
            "search=wide", "search.params=1e5", "search.tolerance=0.1", "search.space.hidden_size.step=16",
            "search.max_candidates=4", "search.eval_blocks=8", "prune.calibration.num_samples=16",
            "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=8", f"train.max_steps={STEPS}",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_blocks=8", "train.warmup_steps=1",
            "train.save_every=0", *extra]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_teacher, corpus_dir):
    out = tmp_path_factory.mktemp("search") / "run"
    proc = run_cli(search_args(tiny_teacher, corpus_dir, out, "logger=wandb"), launcher=SEARCH)
    return out, proc


def test_a_zero3_sharded_teacher_over_two_processes_searches_like_one(tmp_path, tiny_teacher, corpus_dir, searched):
    """The importance pass and the zero-shot scores run on the teacher ZeRO-3-partitioned over 2
    ranks, the candidates are sliced from its files and distilled under ZeRO-3 with the teacher's
    partitions in CPU memory (teacher.offload) and their students written in shards
    (export.max_shard_size): the same zero-shot losses and the same distillation losses as one
    process with the teacher whole."""
    import yaml

    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "minitron.cli.search"]
    run_cli(search_args(tiny_teacher, corpus_dir, out, "logger=none", "deepspeed=zero3", "teacher.offload=cpu",
                        "export.max_shard_size=40KB", "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0"),
            launcher=torchrun)
    for distilled in out.glob("candidates/*/distill"):
        assert yaml.safe_load((distilled / "config.yaml").read_text())["teacher"]["offload"] == "cpu"
        index = json.loads((distilled / "model" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert len(list(out.glob("candidates/*/distill"))) == 4
    one, two = candidate_losses(searched[0]), candidate_losses(out)
    assert sorted(one) == sorted(two)
    for name, (zero_shot, distilled) in one.items():
        assert two[name][0] == pytest.approx(zero_shot, rel=1e-5), name
        assert sorted(two[name][1]) == sorted(distilled)
        for steps, loss in distilled.items():
            assert two[name][1][steps] == pytest.approx(loss, rel=1e-5), (name, steps)


def candidate_losses(out):
    return {c["name"]: (c["zero_shot_val_loss"], c["distill"]) for c in json.loads((out / "search.json").read_text())["candidates"]}


def test_search_writes_every_output(searched, tiny_teacher):
    out, proc = searched
    report = json.loads((out / "search.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    cands = report["candidates"]
    assert len(cands) == 4 and [c["rank"] for c in cands] == [1, 2, 3, 4]
    for c in cands:
        assert {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads",
                "params", "non_embedding_params", "memory_gb", "flops_per_token", "zero_shot_val_loss",
                "zero_shot_kl", "distill", "distill_val_loss"} <= set(c)
        assert abs(c["params"] / 1e5 - 1) <= 0.1 and c["zero_shot_kl"] > 0
    # Halving over 4: all four for 2 steps, the better two for 4; the last two are ranked by step 4.
    assert report["rounds"] == summary["rounds"] == [{"candidates": 4, "steps": 2}, {"candidates": 2, "steps": 4}]
    assert [sorted(c["distill"]) for c in cands] == [["2", "4"], ["2", "4"], ["2"], ["2"]]
    assert cands[0]["distill"]["4"] <= cands[1]["distill"]["4"]
    assert max(c["distill"]["2"] for c in cands[:2]) <= min(c["distill"]["2"] for c in cands[2:])
    assert summary["distill_tokens"] == (2 * 4 + 2 * 2) * 8 * 64
    assert summary["winner"]["name"] == report["winner"] == cands[0]["name"]
    assert set(summary["kendall_tau"]) == {"zero_shot_loss_vs_final", "zero_shot_kl_vs_final", "round1_2_steps_vs_final"}
    # Round 1's order agrees with the final one except, at most, for the swap of the last two.
    assert summary["kendall_tau"]["round1_2_steps_vs_final"] in (pytest.approx(1.0), pytest.approx(2 / 3))
    assert f"winner {cands[0]['name']}" in proc.stdout

    csv_rows = (out / "search.csv").read_text().splitlines()
    assert csv_rows[0].startswith("rank,name,num_layers") and [r.split(",")[1] for r in csv_rows[1:]] == [c["name"] for c in cands]
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/search/candidates_*.table.json"))
    assert len(tables) == 1 and all(c["name"] in tables[0].read_text() for c in cands)

    # The winner's pruned checkpoint, as minitron-prune writes it, loads as a plain transformers model.
    winner = out / "winner"
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json", "summary.json"} <= {p.name for p in winner.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(winner)
    assert model.config.num_hidden_layers == cands[0]["num_layers"] and model.config.hidden_size == cands[0]["hidden_size"]
    assert sum(p.numel() for p in model.parameters()) == cands[0]["params"]
    kept = json.loads((winner / "pruning.json").read_text())
    assert kept["teacher"]["path"] == str(tiny_teacher.resolve()) and len(kept["kept"]["hidden"]) == cands[0]["hidden_size"]
    # The importance scores sit where minitron-prune looks for them: pruning the winner's shape
    # next to the search reuses them (no calibration pass).
    assert len(list((out.parent / "importance").glob("*.pt"))) == 1


def test_rerun_redoes_nothing(searched, tiny_teacher, corpus_dir):
    out, _ = searched
    before = {p: p.stat().st_mtime_ns for p in out.glob("candidates/*/*.json")}
    started = time.perf_counter()
    run_cli(search_args(tiny_teacher, corpus_dir, out, "logger=none"), launcher=SEARCH)
    assert {p: p.stat().st_mtime_ns for p in out.glob("candidates/*/*.json")} == before
    assert not list(out.glob("candidates/*/distill/metrics.jsonl.*"))
    print(f"rerun took {time.perf_counter() - started:.1f} s")


def test_killed_search_restarts_without_redoing_finished_candidates(searched, tiny_teacher, corpus_dir, tmp_path):
    reference, _ = searched
    out = tmp_path / "run"
    args = search_args(tiny_teacher, corpus_dir, out, "logger=none")
    proc = subprocess.Popen([*SEARCH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("candidates/*/steps_*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    assert not (out / "summary.json").exists() and not (out / "winner").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("candidates/*/*.json")}
    assert len([p for p in finished if p.name.startswith("steps_")]) >= 2

    run_cli(args, launcher=SEARCH)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    _close(out, reference)
    assert json.loads((out / "summary.json").read_text())["winner"] == json.loads((reference / "summary.json").read_text())["winner"]


def _close(a, b):
    """Every candidate's zero-shot and per-round losses equal between two searches."""
    la, lb = candidate_losses(a), candidate_losses(b)
    assert la.keys() == lb.keys()
    for name in la:
        assert la[name][0] == pytest.approx(lb[name][0], rel=1e-6)
        assert la[name][1] == pytest.approx(lb[name][1], rel=1e-6)


def test_multirun_jobs_each_take_one_candidate(searched, tiny_teacher, corpus_dir, tmp_path):
    """One sweep over the candidates runs round 1 (each job prunes, scores and distils its own); a
    second sweep runs round 2 for the survivors; the plain command then only ranks and writes."""
    reference, _ = searched
    out = tmp_path / "run"
    args = search_args(tiny_teacher, corpus_dir, out, "logger=none")
    sweep = run_cli(["-m", *args, "search.candidate=0,1,2,3"], launcher=SEARCH)
    assert sweep.stdout.count("waiting for") == 4
    assert len(list(out.glob("candidates/*/zero_shot.json"))) == 4
    assert len(list(out.glob("candidates/*/steps_00000002.json"))) == 4 and not (out / "summary.json").exists()
    run_cli(["-m", *args, "search.candidate=0,1,2,3"], launcher=SEARCH)
    assert len(list(out.glob("candidates/*/steps_00000004.json"))) == 2
    before = {p: p.stat().st_mtime_ns for p in out.glob("candidates/*/*.json")}
    run_cli(args, launcher=SEARCH)
    assert {p: p.stat().st_mtime_ns for p in out.glob("candidates/*/*.json")} == before
    _close(out, reference)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])  # gemma2: logits soft-capped at 3
def test_zero_shot_scores_equal_a_float64_full_logit_reference(family):
    teacher, student = random_model(family, seed=0).double(), random_model(family, seed=1).double()
    blocks = np.random.default_rng(0).integers(0, 90, (5, 12))  # the shared tokenizer: 90 of 97 rows
    gang, cpu = LocalGang(), torch.device("cpu")
    hidden = final_hidden_states(teacher, blocks, 2, gang, cpu, max_blocks=5)
    got = zero_shot_scores(student, hidden, teacher.lm_head.weight, 90, blocks, 2, gang, cpu, max_blocks=5,
                           teacher_softcap=teacher.config.final_logit_softcapping if family == "gemma2" else None)
    ids = torch.from_numpy(blocks)
    with torch.no_grad():
        logq = F.log_softmax(student(ids).logits[:, :-1, :90], -1)
        logp = F.log_softmax(teacher(ids).logits[:, :-1, :90], -1)
    ce = -logq.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1).mean()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean(1).mean()
    assert got["val_loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert got["kl"] == pytest.approx(kl.item(), rel=1e-5)


def bad(tiny_teacher, corpus_dir, tmp_path, *extra):
    return compose_job("search", *search_args(tiny_teacher, corpus_dir, tmp_path / "out", "logger=none", *extra))


@pytest.mark.parametrize("extra, message", [
    (["search.params=1e3"], "search.params: 1000 is met by no candidate within 10%; the nearest feasible budget is "),
    (["search.params=1e6"], "search.params: 1000000 is above the teacher's 158016; the nearest feasible budget is 158016"),
    (["search.params=null"], "search.params: set a budget"),
    (["search.space.num_layers.min=3"], "search.space.num_layers: the range holds no value"),
    (["search.space.num_attention_heads.choices=[3]"], "search.space.num_attention_heads: no value [3] forms whole GQA"),
    (["search.space.hidden_size.choices=[34,38]", "search.space.num_attention_heads.choices=[4]"],
     "search.space.hidden_size: no shape of the space can be saved"),
    (["prune.export.num_layers=1"], "prune.export.num_layers: the search chooses the shape"),
    (["search.candidate=7"], "search.candidate: 7 is not a candidate index (0..3)"),
    (["train.max_steps=1"], "train.max_steps: successive halving over 4 candidates needs at least 2 steps"),
    (["data.path=/nonexistent"], "data.path: no such file"),
])
def test_bad_input_is_named_before_any_model_loads(tiny_teacher, corpus_dir, tmp_path, extra, message):
    cfg = bad(tiny_teacher, corpus_dir, tmp_path, *extra)
    with pytest.raises(ConfigError) as err:
        check_run_inputs(cfg, plan_search(cfg))
    assert str(err.value).startswith(message), str(err.value)


def test_output_dir_of_another_search_or_anything_else_is_refused(searched, tiny_teacher, corpus_dir, tmp_path):
    out, _ = searched
    cfg = compose_job("search", *search_args(tiny_teacher, corpus_dir, out, "search.tolerance=0.12"))
    with pytest.raises(ConfigError, match="^output_dir: .* holds a search with another search.tolerance"):
        check_run_inputs(cfg, plan_search(cfg))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = compose_job("search", *search_args(tiny_teacher, corpus_dir, tmp_path / "mine"))
    with pytest.raises(ConfigError, match="^output_dir: .* is not a minitron search"):
        check_run_inputs(cfg, plan_search(cfg))


def test_bad_input_exits_with_one_line_and_writes_nothing(tiny_teacher, corpus_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(search_args(tiny_teacher, corpus_dir, out, "search.params=1e6"), launcher=SEARCH,
                   check=False, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: search.params: 1000000 is above the teacher's")
    assert not out.exists() and not (tmp_path / "importance").exists()


def test_prune_options_are_checked_like_minitron_prunes(tiny_teacher, corpus_dir, tmp_path):
    cfg = bad(tiny_teacher, corpus_dir, tmp_path, "prune.importance.seq_agg=max")
    with pytest.raises(ConfigError, match="^prune.importance.seq_agg: must be one of mean, l2, var"):
        plan_search(cfg)
    cfg = bad(tiny_teacher, corpus_dir, tmp_path, "prune.calibration.num_samples=0")
    with pytest.raises(ConfigError, match="^prune.calibration.num_samples: the calibration set is empty"):
        check_run_inputs(cfg, plan_search(cfg))
