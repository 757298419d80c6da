"""`minitron-<command> --help`: the command's own groups and keys with their defaults and meaning,
and nothing of the other commands'. One real run of each console script, shared by the tests."""
import dataclasses
import functools
import itertools
import re
import sys
import typing
from pathlib import Path

import pytest

from conftest import run_cli
from minitron import config
from minitron.cli.common import conf_dir
from minitron.cli.help import command_help

SCHEMAS = {"train": config.TrainJobConfig, "prune": config.PruneJobConfig,
           "distill": config.DistillJobConfig, "search": config.SearchJobConfig,
           "eval": config.EvalJobConfig, "pipeline": config.PipelineJobConfig}
# The groups of each command's defaults list and the preset it picks (conf/<command>.yaml).
GROUPS = {"train": {"model": "small", "deepspeed": "zero0", "logger": "wandb"},
          "prune": {"deepspeed": "zero0", "logger": "none"},
          "distill": {"distill": "logits", "deepspeed": "zero0", "logger": "wandb"},
          "search": {"search": "default", "distill": "logits", "deepspeed": "zero0", "logger": "wandb"},
          "eval": {"deepspeed": "zero0", "logger": "none"},
          "pipeline": {"model": "small", "search": "wide", "distill": "logits", "deepspeed": "zero0",
                       "logger": "wandb"}}
# A key of each command and a phrase of its docstring in minitron/config.py.
# A top-level node's doc (`teacher`) is its section's title.
DOCUMENTED = {"train": [("train.lr", "Peak learning rate"),
                        ("resume", "continue from the newest checkpoint")],
              "prune": [("prune.export.hidden_size", "Embedding channels kept"),
                        ("prune.export.num_key_value_heads", "prunes whole KV groups")],
              "distill": [("distill.logits.divergence", "forward_kl"),
                          ("teacher", "The frozen teacher")],
              "search": [("search.params", "Budget: total parameters"),
                         ("search.space.num_layers.*", "One axis of the search space")],
              "eval": [("eval.tasks", "lm-eval-harness tasks"),
                       ("model", "The model to evaluate")],
              "pipeline": [("targets", "The students"),
                           ("targets[].fraction", "fraction of the teacher"),
                           ("search_steps", "Each candidate's distillation budget")]}


@functools.lru_cache(maxsize=None)
def help_of(command: str, *args: str) -> str:
    proc = run_cli([*args], launcher=[f"minitron-{command}"], timeout=120)  # fails unless exit status 0
    return proc.stdout


def schema_keys(cls, prefix: str = "") -> list:
    """Every key of a job's schema, nested dataclasses flattened with dots."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def doc_of(page: str, key: str) -> str:
    """The documentation printed for `key`: the lines indented under its `  key = value` line, or
    the rest of its section's title `key: ...` (a top-level node: model, teacher, ...)."""
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"  {re.escape(key)}( = |$)", line):
            doc = itertools.takewhile(lambda l: l.startswith(" " * 6), lines[i + 1:])
            return " ".join(l.strip() for l in doc)
        if line.startswith(f"{key}: "):
            rest = itertools.takewhile(lambda l: l.startswith(" " * 4), lines[i + 1:])
            return " ".join([line[len(key) + 2:], *(l.strip() for l in rest)])
    raise AssertionError(f"{key} is not on the page")


@pytest.mark.parametrize("command", list(SCHEMAS))
def test_help_lists_the_commands_groups_and_keys_with_their_docs(command):
    page = help_of(command, "--help")
    assert page.startswith(f"usage: minitron-{command} [key=value ...] [-m key=a,b ...]\n")
    summary = (Path(conf_dir()) / f"{command}.yaml").read_text().splitlines()[0].lstrip("# ")
    assert summary in page
    group_lines = re.findall(r"^  (\S+) = (\S+) +choices: (.*)$", page, flags=re.M)
    assert {g: c for g, c, _ in group_lines} == GROUPS[command]
    for group, _, choices in group_lines:
        assert choices.split(", ") == sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))
    for key in schema_keys(SCHEMAS[command]):
        assert re.search(rf"^  {re.escape(key)} = ", page, flags=re.M), key
    for key, phrase in DOCUMENTED[command]:
        assert phrase in doc_of(page, key), key
    assert "_schema" not in page and "hydra/" not in page
    assert "--cfg job" in page and "--hydra-help" in page


def test_distill_help_lists_the_loss_presets():
    page = help_of("distill", "--help")
    assert re.search(r"^  distill = logits +choices: lm, logits, logits_hidden$", page, flags=re.M)


def test_train_help_says_nothing_of_distillation():
    page = help_of("train", "--help")
    assert "train.lr = 0.003" in page  # conf/train.yaml's, over the schema's 2e-3
    assert "distill" not in page.lower() and "_schema" not in page


def test_short_flag_with_overrides_shows_the_overridden_defaults():
    """-h is --help; the overrides beside it are applied, so the page shows the tiny preset."""
    page = help_of("train", "model=tiny", "train.lr=0.01", "-h")
    assert re.search(r"^  model = tiny +choices: small, tiny$", page, flags=re.M)
    assert "  model.hidden_size = 64\n" in page and "  train.lr = 0.01\n" in page
    assert "the values shown include model=tiny train.lr=0.01" in page


def test_overrides_that_do_not_compose_still_give_the_defaults():
    page = command_help("train", conf_dir(), ["model=nope"])
    assert "could not be applied" in page and "model/nope" in page
    assert re.search(r"^  model = small ", page, flags=re.M)


def test_help_needs_no_deepspeed():
    """Help is instant: composing the config imports neither DeepSpeed nor a model library."""
    script = ("import atexit, sys; from minitron.cli.prune import main; "
              "atexit.register(lambda: print(sorted({'deepspeed', 'transformers'} & set(sys.modules)))); "
              "main()")
    proc = run_cli(["--help"], launcher=[sys.executable, "-c", script], timeout=120)
    assert proc.stdout.startswith("usage: minitron-prune") and proc.stdout.rstrip().endswith("[]")
