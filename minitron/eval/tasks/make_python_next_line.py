"""Writes python_next_line.jsonl: a multiple-choice cloze set from the standard library's source.

Each item is 4-8 consecutive non-blank lines of a function and four candidates for the next
non-blank line: the true one and three real lines from elsewhere in the same module. Distractors
are drawn from lines with the same indentation as the truth where there are enough, so that
indentation alone does not give the answer away.

The modules sort after `test/` in the standard library, past the first 12 MB that the embedded
training corpus reads (minitron.data.corpus.EMBEDDED_MAX_BYTES), so a model trained on the
default corpus has not seen them. Everything is fixed (module list, seed, sorted candidates),
so the same Python version regenerates the same file:

    python -m minitron.eval.tasks.make_python_next_line [--out PATH]
"""
import argparse
import ast
import json
import platform
import random
import sysconfig
from pathlib import Path

MODULES = ("textwrap.py", "threading.py", "timeit.py", "tokenize.py", "trace.py", "traceback.py",
           "tracemalloc.py", "turtle.py", "types.py", "typing.py", "unittest/case.py", "urllib/parse.py",
           "uuid.py", "warnings.py", "wave.py", "weakref.py", "webbrowser.py", "xml/dom/minidom.py",
           "xmlrpc/client.py", "zipimport.py")
ITEMS_PER_MODULE = 10
CONTEXT_LINES = (4, 8)
NUM_CHOICES = 4
MIN_ANSWER_CHARS = 8  # shorter lines ("else:", "pass", ")") are too generic to tell apart
MAX_LINE_CHARS = 100  # keeps the file small and the contexts inside a tiny model's window
SEED = 1234
DEFAULT_OUT = Path(__file__).with_name("python_next_line.jsonl")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def function_spans(source: str) -> list:
    """(first, last) 1-based line numbers of every function and method, nested ones included."""
    nodes = (n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return sorted({(n.lineno, n.end_lineno) for n in nodes})


def is_answer(line: str) -> bool:
    """A line worth predicting: code (not a comment), long enough to be specific."""
    text = line.strip()
    return len(text) >= MIN_ANSWER_CHARS and not text.startswith("#") and len(line) <= MAX_LINE_CHARS


def indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def candidate_answers(lines: list, spans: list) -> list:
    """(answer line number, context line numbers, span): every non-blank line of a function with
    at least CONTEXT_LINES[0] non-blank lines of the same function before it. Each answer line is
    kept once, under the innermost function that contains it."""
    found = {}
    for first, last in spans:
        numbers = [n for n in range(first, last + 1) if lines[n - 1].strip()]
        for i in range(CONTEXT_LINES[0], len(numbers)):
            n = numbers[i]
            window = numbers[max(0, i - CONTEXT_LINES[1]):i]
            if is_answer(lines[n - 1]) and all(len(lines[m - 1]) <= MAX_LINE_CHARS for m in window):
                found[n] = (n, window, (first, last))  # later (inner, since sorted by start) spans win
    return [found[n] for n in sorted(found)]


def pick_distractors(lines: list, truth: str, span: tuple, rng: random.Random) -> list:
    """Three distinct real lines of the module outside the item's function, unlike the truth;
    same indentation as the truth when the module has enough of them."""
    seen, pool = {truth.strip()}, []
    for n, line in enumerate(lines, 1):
        if span[0] <= n <= span[1] or not is_answer(line) or line.strip() in seen:
            continue
        seen.add(line.strip())
        pool.append(line)
    same = [line for line in pool if indent(line) == indent(truth)]
    return rng.sample(same if len(same) >= NUM_CHOICES - 1 else pool, NUM_CHOICES - 1)


def module_items(name: str, rng: random.Random) -> list:
    """ITEMS_PER_MODULE items from one module, in source order."""
    source = (stdlib_dir() / name).read_text(encoding="utf-8")
    lines = source.splitlines()
    candidates = candidate_answers(lines, function_spans(source))
    items = []
    for n, window, span in sorted(rng.sample(candidates, ITEMS_PER_MODULE)):
        k = rng.randint(CONTEXT_LINES[0], min(CONTEXT_LINES[1], len(window)))
        context = [lines[m - 1] for m in window[-k:]]
        truth = lines[n - 1]
        choices = [truth, *pick_distractors(lines, truth, span, rng)]
        rng.shuffle(choices)
        items.append({"context": "\n".join(context), "choices": choices, "label": choices.index(truth),
                      "source": f"{name}:{window[-k]}", "python": platform.python_version()})
    return items


def build_items() -> list:
    """All items; one generator seeded once, modules in a fixed order."""
    rng = random.Random(SEED)
    return [item for name in MODULES for item in module_items(name, rng)]


def render(items: list) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args(argv).out
    items = build_items()
    out.write_text(render(items))
    print(f"wrote {len(items)} items to {out}")


if __name__ == "__main__":
    main()
