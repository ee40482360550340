"""The pages the docs site generates, so they cannot drift from what they describe.

The home page is README.md, its links rewritten to point inside the site. Every registered
dataset, model, attack, compressor, training objective and shift gets a section: its name, the
class or factory behind it, the first paragraph of its docstring (which cites its paper) and its
options, with the types and defaults the dataclass (or the model factory's signature) declares
and the descriptions its docstring's ``Attributes:``/``Args:`` section gives.

``mkdocs.yml`` loads this file as a hook: ``on_files`` adds the pages as generated files
(``index.md``, ``results.md`` and ``components/<kind>.md``, never written to disk), so
``mkdocs build`` always shows this checkout's README, its results files and the registries of
its ``src/``. ``pages()`` returns
them as text for the tests.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "components"
# kind: (page title, how an experiment file names it, `robcomp list` argument)
KINDS: dict[str, tuple[str, str, str]] = {
    "datasets": ("Datasets", "`data: {name: ..., OPTION: ...}`", "datasets"),
    "models": ("Models", "`model: {name: ..., options: {OPTION: ...}}`", "models"),
    "attacks": ("Attacks", "`evaluate.attacks: [{name: ..., OPTION: ...}]`", "attacks"),
    "compressors": ("Compressors", "`compress: {name: ..., OPTION: ...}`", "compressors"),
    "objectives": (
        "Training objectives",
        "`train.objective` / `finetune.objective: {name: ..., OPTION: ...}`",
        "objectives",
    ),
    "shifts": ("Shifts", "`evaluate.shifts: [{name: ..., OPTION: ...}]`", "shifts"),
}
# What a kind's page says besides its registry.
NOTES = {
    "models": "Besides these names, `timm:<name>`, `torchvision:<name>` and your own "
    "`module:callable` build other architectures ([Bring your own model](../bring-your-own.md)); "
    "every model gets robcomp's Normalize layer in front (`model.mean`, `model.std`).",
    "attacks": "`eps` is in pixel units of [0, 1] inputs; the evaluator checks every adversarial "
    "batch against the threat model. `robcomp list presets` names the shipped suites "
    "([Evaluation suites](../evaluation.md)).",
}
# Arguments every model factory takes from the data, not from the experiment file.
MODEL_DATA_ARGS = ("num_classes", "in_shape")
SECTION = re.compile(r"^(Attributes|Args|Arguments|Parameters):\s*$")
ENTRY = re.compile(r"^(?P<name>\*{0,2}\w+)(?: \([^)]*\))?:\s*(?P<text>.*)$")
CODE_WITH_PIPE = re.compile(r"`([^`]*\|[^`]*)`")
DOCS_LINK = re.compile(r"\]\(docs/")
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(?P<tilde>~?)(?P<path>[\w.]+)`")


def registries() -> dict[str, Any]:
    """The registries by kind, imported from this checkout's ``src/``."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from robcomp.attacks import ATTACKS
    from robcomp.compress import COMPRESSORS
    from robcomp.data import DATASETS
    from robcomp.evaluate import SHIFTS  # data's shifts and the evaluate layer's (manifold-sets)
    from robcomp.models import MODELS
    from robcomp.train import OBJECTIVES

    found = {
        "datasets": DATASETS,
        "models": MODELS,
        "attacks": ATTACKS,
        "compressors": COMPRESSORS,
        "objectives": OBJECTIVES,
        "shifts": SHIFTS,
    }
    assert set(found) == set(KINDS)
    return found


def markdown_roles(text: str) -> str:
    """Sphinx cross-reference roles (``:class:`~a.b.C```, ``:func:`f```) as Markdown code spans
    with the object's short name (the ``~`` form) or its dotted path as written."""

    def code(match: re.Match[str]) -> str:
        path = match["path"]
        return f"`{path.rsplit('.', 1)[-1] if match['tilde'] else path}`"

    return ROLE.sub(code, text)


def markdown(text: str) -> str:
    """Docstring markup as Markdown: Sphinx roles and RST literals become code spans."""
    return markdown_roles(text).replace("``", "`")


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n")[0]
    return markdown(" ".join(first.split())) or "(no docstring)"


def described(obj: Any) -> dict[str, str]:
    """Field descriptions from the ``Attributes:``/``Args:`` sections of ``obj``'s docstring
    and, for a class, of its bases' (a subclass's own wins)."""
    if not inspect.isclass(obj):
        return _sections(inspect.cleandoc(obj.__doc__ or ""))
    found: dict[str, str] = {}
    for source in reversed(inspect.getmro(obj)):
        found.update(_sections(inspect.cleandoc(source.__dict__.get("__doc__") or "")))
    return found


def _sections(doc: str) -> dict[str, str]:
    found: dict[str, str] = {}
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if SECTION.match(line):
            found.update(_entries(lines[i + 1 :]))
    return found


def _entries(lines: list[str]) -> Iterator[tuple[str, str]]:
    """``name: text`` entries of one indented section, continuation lines joined."""
    name, text, indent = "", [], None
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent or depth == 0:
            break
        match = ENTRY.match(line.strip()) if depth == indent else None
        if match:
            if name:
                yield name, " ".join(text)
            name, text = match["name"].lstrip("*"), [match["text"]]
        elif name:
            text.append(line.strip())
    if name:
        yield name, " ".join(text)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if annotation is inspect.Parameter.empty:
        return ""
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _default(value: Any) -> str:
    if value is dataclasses.MISSING or value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, tuple):
        value = list(value)  # as an experiment file writes it
    return f"`{value!r}`"


def options(obj: Any) -> list[tuple[str, str, str]]:
    """(name, type, default) of every option: a dataclass's init fields (private ones left
    out), else a factory's keyword parameters except those filled from the data."""
    if dataclasses.is_dataclass(obj):
        from robcomp.config import fields_of  # run-time fields (a bound VAE) are no options

        rows = []
        for f in fields_of(obj).values():
            if f.name.startswith("_"):
                continue
            default: Any = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            rows.append((f.name, _type_name(f.type), _default(default)))
        return rows
    params = inspect.signature(obj).parameters.values()
    return [
        (p.name, _type_name(p.annotation), _default(p.default))
        for p in params
        if p.name not in MODEL_DATA_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def section(name: str, obj: Any) -> str:
    """One component's section: name, where it lives, what it is, its options."""
    where = f"{obj.__module__}.{obj.__qualname__}"
    lines = [f"## `{name}`", "", f"`{where}`", "", summary(obj), ""]
    rows = options(obj)
    notes = described(obj)
    if not rows:
        lines.append("No options.")
    for field, kind, default in rows:
        typed = f"`{kind}`, " if kind else ""
        note = f": {markdown(notes[field])}" if field in notes else ""
        lines.append(f"- **`{field}`** ({typed}{'default ' if default != 'required' else ''}"
                     f"{default}){note}")  # fmt: skip
    return "\n".join(lines) + "\n"


def page(kind: str, registry: Any) -> str:
    """The Markdown page of one kind of component."""
    title, usage, listed = KINDS[kind]
    names = registry.names()
    head = [
        f"# {title}",
        "",
        f"Generated from robcomp's `{registry.kind}` registry when the site is built "
        f"(`robcomp list {listed}` prints the same {len(names)} names). An experiment file "
        f"names one as {usage}; an option left out keeps the default shown.",
        "",
        *([NOTES[kind], ""] if kind in NOTES else []),
        "| name | what it is |",
        "|---|---|",
    ]
    head += [f"| [`{n}`](#{_anchor(n)}) | {_table_cell(summary(registry.get(n)))} |" for n in names]
    body = [section(n, registry.get(n)) for n in names]
    return "\n".join(head) + "\n\n" + "\n".join(body)


def _anchor(name: str) -> str:
    """The id Python-Markdown's toc gives the heading ``## `name```."""
    return re.sub(r"[^\w-]", "", name.lower().replace(" ", "-"))


def _table_cell(text: str) -> str:
    """A summary in a table cell. A pipe would end the cell, and an escaped one shows its
    backslash inside a code span, so code holding a pipe (a norm in a formula) becomes HTML."""

    def code(match: re.Match[str]) -> str:
        inner = html.escape(match[1])
        for char in "|_*":  # Markdown still reads emphasis inside inline HTML
            inner = inner.replace(char, f"&#{ord(char)};")
        return f"<code>{inner}</code>"

    return CODE_WITH_PIPE.sub(code, text).replace("|", "\\|")


def home_page() -> str:
    """README.md as the site's home page: its links into ``docs/`` made relative to the site."""
    text = (ROOT / "README.md").read_text()
    return DOCS_LINK.sub("](", text)


def results_page() -> str:
    """Where the docs' numbers come from: every kept run (``docs/results/<name>/run.json``)
    and every benchmark result (``bench/results/*.json``), as those files record them."""
    lines = [
        "# Where the numbers come from",
        "",
        "Every measured number in these pages is written from one of these files by",
        "`scripts/docs_numbers.py` ([contributing](contributing.md)). This page is generated from",
        "them when the site is built.",
        "",
        "## Runs of shipped configs",
        "",
        "`python scripts/docs_numbers.py --refresh NAME` reruns one (the recorded command) and",
        "keeps its `leaderboard.json` under `docs/results/NAME/`.",
        "",
        "| NAME | command | commit | date | wall time | cores | load before |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in sorted((ROOT / "docs/results").glob("*/run.json")):
        lines.append(_run_row(run.parent.name, json.loads(run.read_text())))
    lines += [
        "",
        "## Benchmarks",
        "",
        "`python bench/NAME.py` writes `bench/results/NAME.json` ([benchmarks](benchmarks.md)).",
        "",
    ]
    for result in sorted((ROOT / "bench/results").glob("*.json")):
        script = Path("bench") / f"{result.stem}.py"
        what = f"`python {script}`" if (ROOT / script).is_file() else "(no script of that name)"
        lines.append(f"- `bench/results/{result.name}`: {what}")
    return "\n".join(lines) + "\n"


def _run_row(name: str, run: dict[str, Any]) -> str:
    commit = str(run.get("commit", "?"))[:10]
    if run.get("uncommitted_changes"):
        commit += " (+ changes)"
    wall, load = run.get("wall_seconds"), run.get("load_1min_before")
    cells = [
        f"`{name}`",
        _table_cell(f"`{run.get('command', '?')}`"),
        f"`{commit}`",
        str(run.get("date", "?"))[:16].replace("T", " "),
        f"{wall:.0f} s" if isinstance(wall, int | float) else "?",
        str(run.get("cpus", "?")),
        f"{load:.2f}" if isinstance(load, int | float) else "?",
    ]
    return "| " + " | ".join(cells) + " |"


def pages() -> dict[str, str]:
    """Every generated page by its path under docs/: the home page and one per component kind."""
    generated = {"index.md": home_page(), "results.md": results_page()}
    generated |= {f"{FOLDER}/{kind}.md": page(kind, reg) for kind, reg in registries().items()}
    return generated


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the component pages as generated files (nothing written to docs/)."""
    from mkdocs.structure.files import File

    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    return files
