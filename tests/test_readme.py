"""Every shell command in README.md's ```bash blocks runs as written, in README order, in one
working directory, with $MINITRON_STEP_CAP shrinking step counts and evaluation sizes (the
commands themselves are not changed).

What a reader supplies is made here: the files the examples name as the reader's own (my_corpus/,
book.txt, code.jsonl, prose.txt, corpus/, from the standard library's source), a Llama-3.1-8B
`config.json` for the dry runs, and path/to/teacher, the teacher the reader brings (the README's own
runs/train/model). `...` stands for the arguments of the line above, with keys set again replaced;
`<key>` is the one directory that matches. The quick start's `pip install ... &&` is left out (the
suite runs installed) and so is its `pytest tests` (this suite).
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "ast.py", "calendar.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
           "fractions.py", "functools.py", "inspect.py", "pathlib.py", "random.py", "shutil.py", "typing.py"]
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "head_dim": 128}


def readme_commands(text: str) -> list:
    """Each command of the ```bash blocks as an argument list, continuation lines joined, comments
    dropped, `...` expanded."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if not args:
                continue
            if "&&" in args:  # the quick start: install, then the command
                args = args[len(args) - args[::-1].index("&&"):]
            if args[:1] == ["pytest"]:
                continue
            if "..." in args:
                args = expand(commands[-1], args)
            commands.append(args)
    return commands


def expand(previous: list, args: list) -> list:
    """`prog ... k=v`: the previous command's arguments, those whose key is set again dropped."""
    i = args.index("...")
    new = args[i + 1:]
    keys = {a.split("=", 1)[0] for a in new if "=" in a}
    kept = [a for a in previous[1:] if a.split("=", 1)[0] not in keys]
    return [*args[:i], *kept, *new]


def resolve_placeholders(args: list, cwd: Path) -> list:
    out = []
    for arg in args:
        if "<key>" in arg:
            key, _, path = arg.partition("=")
            matches = sorted(glob.glob(path.replace("<key>", "*"), root_dir=cwd))
            assert matches, f"nothing matches {path}"
            arg = f"{key}={matches[0]}"
        out.append(arg)
    return out


def make_reader_files(cwd: Path) -> None:
    texts = {name: (STDLIB / name).read_text(encoding="utf-8") for name in MODULES}
    (cwd / "my_corpus").mkdir()
    (cwd / "corpus").mkdir()
    for name, text in texts.items():
        (cwd / "my_corpus" / f"{Path(name).stem}.txt").write_text(text)
        (cwd / "corpus" / f"{Path(name).stem}.txt").write_text(text)
    (cwd / "book.txt").write_text("\n\n".join(texts.values()))
    (cwd / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts.values()))
    (cwd / "prose.txt").write_text("\n\n".join(texts.values()))
    llama = cwd / "path" / "to" / "Llama-3.1-8B"
    llama.mkdir(parents=True)
    (llama / "config.json").write_text(json.dumps(LLAMA_31_8B))
    (cwd / "path" / "to" / "teacher").symlink_to(cwd / "runs" / "train" / "model")


def test_readme_commands_are_extracted_as_written():
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands[0] == ["minitron-pipeline"]
    distill = [c for c in commands if c[0] == "minitron-distill"]
    assert len(distill) == 4 and distill[1] == [
        "minitron-distill", "teacher.path=runs/train/model", "student.path=runs/pruned", "distill=logits_hidden",
        "deepspeed=zero3", "output_dir=runs/distill_hidden"], distill[1]
    assert all(c[0].startswith("minitron-") for c in commands), [c[0] for c in commands]


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    cwd = tmp_path / "reader"
    cwd.mkdir()
    make_reader_files(cwd)
    env = {**os.environ, "MINITRON_STEP_CAP": "2"}
    failures = []
    for args in readme_commands((REPO / "README.md").read_text()):
        args = resolve_placeholders(args, cwd)
        started = time.perf_counter()
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        print(f"{time.perf_counter() - started:6.1f} s  rc {proc.returncode}  {shlex.join(args)}")
        if proc.returncode != 0:
            failures.append(f"{shlex.join(args)}\n{(proc.stdout + proc.stderr)[-2000:]}")
    assert not failures, "\n\n".join(failures)
    # The sweep example makes its two runs and nothing else beside them (Hydra's multirun.yaml).
    runs = sorted(p.name for p in (cwd / "runs").iterdir() if p.name.startswith("lr"))
    assert runs == ["lr0.001", "lr0.003"], runs
