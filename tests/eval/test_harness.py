"""The lm-eval harness: its scores against log-probabilities computed here the way lm-eval's
multiple_choice defines them, the shipped python_next_line data against the standard library it
was cut from, and the one-line errors for unknown tasks and data that is not downloaded."""
import json
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from minitron.config import ConfigError
from minitron.eval import harness
from minitron.eval.tasks import make_python_next_line as make

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval[hf]: the HFLM wrapper imports it

TASK = "python_next_line"
LIMIT = 40
DATA = harness.TASKS_DIR / f"{TASK}.jsonl"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def rows() -> list:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)


# ---------------------------------------------------------------- scores against a reference


@torch.no_grad()
def reference_loglikelihoods(model, tokenizer, context: str, choices: list, delimiter: str) -> list:
    """Sum of log-probs of each choice's tokens after the context, one unpadded forward each, as
    lm-eval forms them: continuation = target_delimiter + choice; trailing whitespace of the
    context moves to the continuation; the continuation's tokens are those of encode(context +
    continuation) past encode(context); the input is cut to the last max_length tokens."""
    max_length = model.config.max_position_embeddings
    lls = []
    for choice in choices:
        ctx, cont = context.rstrip(), context[len(context.rstrip()):] + delimiter + choice
        ctx_ids = tokenizer.encode(ctx)
        cont_ids = tokenizer.encode(ctx + cont)[len(ctx_ids):]
        inp = (ctx_ids + cont_ids)[-(max_length + 1):][:-1]
        logprobs = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)[-len(cont_ids):]
        lls.append(logprobs.gather(1, torch.tensor(cont_ids)[:, None]).sum().item())
    return lls


def reference_predictions(model, tokenizer, docs: list) -> list:
    """(loglikelihoods, argmax, argmax of loglikelihood per character) of each doc."""
    delimiter = harness.local_task_config(TASK)["target_delimiter"]
    out = []
    for doc in docs:
        lls = torch.tensor(reference_loglikelihoods(model, tokenizer, doc["context"], doc["choices"], delimiter),
                           dtype=torch.float64)
        chars = torch.tensor([len(c) for c in doc["choices"]], dtype=torch.float64)
        out.append((lls, int(lls.argmax()), int((lls / chars).argmax())))
    return out


def test_python_next_line_scores_match_reference(teacher, tmp_path, monkeypatch):
    model, tokenizer = teacher
    monkeypatch.chdir(tmp_path)  # the data file resolves from anywhere, and nothing lands here
    scores = harness.run_tasks(model, tokenizer, [TASK], batch_size=8, limit=LIMIT, seed=0)
    assert list(scores) == [TASK] and list(tmp_path.iterdir()) == []
    got = scores[TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(got)
    assert all(type(v) is float for v in got.values()) and 0 <= got["acc"] <= 1 and 0 <= got["acc_norm"] <= 1

    docs = rows()[:LIMIT]
    ref = reference_predictions(model, tokenizer, docs)
    assert got["acc"] == pytest.approx(sum(p == d["label"] for (_, p, _), d in zip(ref, docs)) / LIMIT, abs=1e-12)
    assert got["acc_norm"] == pytest.approx(sum(p == d["label"] for (_, _, p), d in zip(ref, docs)) / LIMIT, abs=1e-12)

    # Item by item: lm-eval's per-choice log-likelihoods (batched, right-padded) against ours.
    raw = harness._evaluate(harness._wrap(model, tokenizer, 8, "cpu"), harness._task_manager(False), TASK,
                            limit=LIMIT, seed=0, log_samples=True)
    samples = sorted(raw["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for sample, (lls, pred, pred_norm), doc in zip(samples, ref, docs):
        theirs = torch.tensor([resp[0][0] for resp in sample["resps"]], dtype=torch.float64)
        torch.testing.assert_close(theirs, lls, rtol=0, atol=1e-4)
        assert sample["acc"] == float(pred == doc["label"]) and sample["acc_norm"] == float(pred_norm == doc["label"])

    assert harness._scores(raw) == scores  # a second evaluation gives the same numbers


# ---------------------------------------------------------------- the shipped data


def test_shipped_items_are_well_formed():
    items = rows()
    assert 150 <= len(items) <= 250 and DATA.stat().st_size < 200_000
    for item in items:
        assert set(item) == {"context", "choices", "label", "source", "python"}
        assert len(item["choices"]) == 4 and len({c.strip() for c in item["choices"]}) == 4
        assert item["label"] in range(4)
        assert 4 <= len(item["context"].splitlines()) <= 8
        assert item["source"].split(":")[0] in make.MODULES
    config = harness.local_task_config(TASK)
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == DATA and DATA.is_absolute()


def check_against_source(item) -> bool:
    """True when the item's context is at its named place in this machine's stdlib (then its
    truth must be the next non-blank line and every choice a line of that module); False when the
    file or its version differs."""
    name, line = item["source"].rsplit(":", 1)
    path = STDLIB / name
    if not path.exists():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    following = [text for text in lines[int(line) - 1:] if text.strip()]
    context = item["context"].splitlines()
    if following[:len(context)] != context:
        return False
    assert following[len(context)] == item["choices"][item["label"]], item["source"]
    assert set(item["choices"]) <= set(lines), item["source"]
    return True


def test_truth_is_the_next_line_of_the_named_source():
    items = rows()
    checked = [check_against_source(item) for item in items]
    if platform.python_version() == items[0]["python"]:
        assert all(checked)
    elif not any(checked):
        pytest.skip(f"the data was cut from Python {items[0]['python']}'s stdlib, not {platform.python_version()}'s")


def test_generator_reproduces_the_file(tmp_path):
    if platform.python_version() != rows()[0]["python"]:
        pytest.skip(f"the data was cut from Python {rows()[0]['python']}'s stdlib")
    make.main(["--out", str(tmp_path / "again.jsonl")])
    assert (tmp_path / "again.jsonl").read_text() == DATA.read_text()


# ---------------------------------------------------------------- task names and missing data


def test_check_tasks_rejects_unknown_names():
    with pytest.raises(ConfigError, match=r"^eval\.tasks: unknown task 'hellaswagg'.*hellaswag") as e:
        harness.check_tasks([TASK, "hellaswagg"])
    assert "\n" not in str(e.value)
    harness.check_tasks([TASK, "hellaswag", "arc_easy"])  # known to lm-eval: fine before any download


def test_empty_task_list_needs_no_lm_eval():
    code = ("import sys; from minitron.eval import harness; harness.check_tasks([]); "
            "assert 'lm_eval' not in sys.modules, 'imported lm_eval'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", ["hellaswag", "arc_easy"])
def test_task_without_data_is_a_one_line_error(teacher, name):
    model, tokenizer = teacher
    with pytest.raises(ConfigError, match=rf"^eval\.tasks: {name}: its data is not available") as e:
        harness.run_tasks(model, tokenizer, [name], limit=2)
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
