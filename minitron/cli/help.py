"""`minitron-<command> --help`: this command's groups and keys, each with its default and what it
means, instead of Hydra's generic page (which lists every group in conf/, other commands' and the
schema nodes included, and no key at all).

The keys come from composing the command's config the way a run would; their meaning is the
docstring under each field of the job's dataclass in minitron/config.py, read from the source
with `ast` (Python keeps no attribute docstrings at runtime)."""
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import typing
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

from minitron import config

JOB_SCHEMAS = {"train": config.TrainJobConfig, "prune": config.PruneJobConfig,
               "distill": config.DistillJobConfig, "search": config.SearchJobConfig,
               "eval": config.EvalJobConfig, "pipeline": config.PipelineJobConfig,
               "plan": config.PlanJobConfig, "plan_prune": config.PrunePlanJobConfig}
WIDTH = 100
KEY_INDENT, DOC_INDENT = "  ", "      "

Entry = Tuple[str, Optional[str], Optional[str]]  # (key, shown default or None for a node, doc)


def command_help(config_name: str, conf_dir: str, overrides: Optional[Sequence[str]] = None) -> str:
    """The help page of minitron-<config_name>. `overrides`: key=value arguments whose values the
    page shows (group choices included); None takes them from the command line, so that
    `minitron-train model=tiny --help` shows the tiny preset's values."""
    wanted = _plain_overrides(sys.argv[1:] if overrides is None else overrides)
    cfg, choices, problem = _compose(config_name, conf_dir, wanted)
    command = config_name.replace("_", " ")  # plan_prune is `minitron-plan prune`
    lines = [f"usage: minitron-{command} [key=value ...] [-m key=a,b ...]", "",
             *_description(Path(conf_dir) / f"{config_name}.yaml"), ""]
    lines += _group_lines(conf_dir, cfg, choices)
    if problem:
        lines += [f"(The overrides could not be applied, so the defaults are shown: {problem})", ""]
    shown = "the values shown include " + " ".join(wanted) if wanted and not problem else "defaults shown"
    lines += [f"Keys (key=value sets one; {shown}):"]
    lines += _key_lines(cfg, JOB_SCHEMAS[config_name])
    lines += ["Lists of settings are set whole, e.g. 'data.sources=[{path: a.jsonl, weight: 0.8}]';",
              "x[].y is the key y of each element of the list x.",
              "--cfg job prints the composed config (with any overrides); --hydra-help shows Hydra's own",
              "options (launcher, sweeper, output directories)."]
    return "\n".join(lines)


def _plain_overrides(args: Sequence[str]) -> List[str]:
    """key=value arguments of the job's own config: flags (--help, -m, --cfg) and Hydra's own keys
    say nothing about the values this page shows."""
    return [a for a in args if "=" in a and not a.startswith("-")
            and a.lstrip("+~").split("=")[0].split(".")[0].split("/")[0] != "hydra"]


def _compose(config_name: str, conf_dir: str, overrides: List[str]):
    """(config without Hydra's node, group -> choice, why the overrides were dropped or None).
    Overrides that do not compose (a typo, a sweep's a,b) still leave a page of defaults: help is
    what a user asks for when unsure of the keys."""
    try:
        return (*_compose_once(config_name, conf_dir, overrides), None)
    except Exception as e:
        if not overrides:
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (*_compose_once(config_name, conf_dir, []), first_line)


def _compose_once(config_name: str, conf_dir: str, overrides: List[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    config.register_schemas()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = {g: c for g, c in cfg.hydra.runtime.choices.items() if not g.startswith("hydra/")}
    container = OmegaConf.to_container(cfg, resolve=False)  # ${...} shown as the user would write it
    container.pop("hydra")
    return container, choices


def _description(yaml_path: Path) -> List[str]:
    """The leading `#` comment block of conf/<command>.yaml: a summary line and examples."""
    lines = []
    for line in yaml_path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def _group_lines(conf_dir: str, cfg: dict, choices: dict) -> List[str]:
    """The groups of this command's defaults list, in the order of the keys they fill; the choices
    are conf/<group>/*.yaml (the `_schema` nodes of the ConfigStore are no preset)."""
    if not choices:
        return []
    order = list(cfg)
    groups = sorted(choices, key=lambda g: order.index(g) if g in order else len(order))
    width = max(len(f"{g} = {choices[g]}") for g in groups)
    lines = ["Config groups (group=choice picks a preset from conf/<group>/):"]
    for group in groups:
        stems = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        stems = [s for s in stems if not s.endswith("_schema")]
        current = f"{group} = {choices[group]}"
        lines.append(f"{KEY_INDENT}{current:<{width}}   choices: {', '.join(stems)}")
    return lines + [""]


def _key_lines(cfg: dict, job_cls) -> List[str]:
    """One section for the top-level settings, then one per top-level node (model, data, ...)."""
    docs, hints = field_docs(job_cls), typing.get_type_hints(job_cls)
    seen = set()
    top = [k for k in cfg if not (_node_class(hints.get(k)) and isinstance(cfg[k], dict))]
    lines = _render(_entries({k: cfg[k] for k in top}, job_cls, "", seen))
    for key in cfg:
        if key in top:
            continue
        cls = _node_class(hints[key])
        lines += [""] + _title(key, docs.get(key) or _class_doc_once(cls, seen))
        lines += _render(_entries(cfg[key], cls, f"{key}.", seen))
    return lines + [""]


def _entries(values: dict, cls, prefix: str, seen: set) -> List[Entry]:
    """Every key under `values` (a node of the composed config whose schema is `cls`), flattened
    with dots. A nested node gets a `prefix.node.*` line for its doc; the elements of a list of
    dataclasses are described by the element class's fields and defaults (`key[].field`)."""
    docs = field_docs(cls) if cls else {}
    hints = typing.get_type_hints(cls) if cls else {}
    out = []
    for name, value in values.items():
        key, tp = f"{prefix}{name}", hints.get(name)
        node = _node_class(tp)
        if node and isinstance(value, dict):
            doc = docs.get(name) or _class_doc_once(node, seen)
            if doc:
                out.append((f"{key}.*", None, doc))
            out += _entries(value, node, f"{key}.", seen)
            continue
        element = _element_class(tp)
        if element and isinstance(value, list):  # what each element sets; its keys follow below
            value = [_without_defaults(item, _defaults(element)) for item in value]
        out.append((key, _show(value), docs.get(name)))
        if element:
            doc = _class_doc_once(element, seen)
            if doc:
                out.append((f"{key}[].*", None, doc))
            out += _entries(_defaults(element), element, f"{key}[].", seen)
    return out


def _render(entries: List[Entry]) -> List[str]:
    lines = []
    for key, value, doc in entries:
        lines.append(f"{KEY_INDENT}{key}" if value is None else f"{KEY_INDENT}{key} = {value}")
        if doc:
            lines += textwrap.wrap(" ".join(doc.split()), WIDTH, initial_indent=DOC_INDENT,
                                   subsequent_indent=DOC_INDENT, break_on_hyphens=False)
    return lines


def _title(key: str, doc: Optional[str]) -> List[str]:
    """A section's first line: `model: <the job's doc of its model>`."""
    if not doc:
        return [f"{key}:"]
    return textwrap.wrap(f"{key}: {' '.join(doc.split())}", WIDTH, subsequent_indent="    ",
                         break_on_hyphens=False)


def _show(value) -> str:
    """A value as it would be written on the command line (YAML flow style: null, true, [a, b])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _node_class(tp):
    """The dataclass a field holds (directly or as Optional), else None."""
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _element_class(tp):
    """The dataclass of a List[...]'s elements, else None."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, List):
        return _node_class(typing.get_args(tp)[0])
    return None


def _defaults(cls) -> dict:
    """A dataclass's defaults as a plain dict ("???" is OmegaConf's mark for a required value)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "???"
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _without_defaults(item, defaults: dict):
    return {k: v for k, v in item.items() if v != defaults.get(k)} if isinstance(item, dict) else item


def _class_doc_once(cls, seen: set) -> Optional[str]:
    """A dataclass's own docstring, the first time the page meets the class (AxisRange holds five
    axes; its doc once is enough)."""
    if cls is None or cls in seen:
        return None
    seen.add(cls)
    return _source_docs(inspect.getsourcefile(cls)).get((cls.__name__, None))


def field_docs(cls) -> dict:
    """field name -> the docstring literal under it in `cls` (or in a dataclass it inherits from)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for (owner, name), doc in _source_docs(inspect.getsourcefile(klass)).items():
                if owner == klass.__name__ and name is not None:
                    docs[name] = doc
    return docs


@functools.lru_cache(maxsize=None)
def _source_docs(path: str) -> dict:
    """(class name, field name or None for the class itself) -> docstring, for the module-level
    classes of a source file. An attribute docstring is a string expression right after an
    annotated assignment; `dataclass` writes a signature into __doc__, so the class's own
    docstring is read from the source too."""
    docs = {}
    for node in ast.parse(Path(path).read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs[(node.name, None)] = ast.get_docstring(node)
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[(node.name, stmt.target.id)] = inspect.cleandoc(after.value.value)
    return docs
