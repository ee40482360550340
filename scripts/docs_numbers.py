"""Numbers in the docs come from results files: regenerate them, check them, refresh the files.

README.md and every Markdown page under docs/ (docs/results/ excepted) may hold markers, HTML
comments that rendered Markdown hides, around text this script writes:

* an inline value::

      <!-- n: bench/results/attacks.json#/apgd_speedup_vs_official fmt=.1f -->5.7<!-- /n -->

  ``n:`` is followed by an expression over *references* ``FILE#POINTER`` (FILE relative to the
  repository root, or an alias; POINTER a JSON pointer, RFC 6901), numbers, ``+ - * /``,
  parentheses and ``abs``, ``min``, ``max``, ``round``; operators need spaces around them, since
  a pointer may hold ``-``. ``fmt=`` is a Python format spec (default: the value as is). A
  pointer segment ``[key=value,key2=value2]`` picks the one element of a list whose fields have
  those values (a field holding a component spec ``{name: ...}`` matches its name), so a
  leaderboard row is named by what it is, not by its position::

      <!-- n: 100*q#/[compress=l1-filter-0.5]/clean_accuracy fmt=.1f -->91.5<!-- /n -->

* an alias for a file, valid in the whole page::

      <!-- data: q = docs/results/quickstart/leaderboard.json -->

* a claim the prose makes, checked against the files (an error when it no longer holds, so
  the sentence gets reworded, not only its numbers)::

      at the same robust accuracy<!-- claim: ba#/apgd_gap_points == 0 --> as the official

  Claims may compare (``< <= > >= == !=``, chained) and combine (``and``, ``or``) expressions;
  strings are quoted (``q#/0/compress == "distill-tiny_mlp"``).

* a block, from a preset's ``leaderboard.json``::

      <!-- table: q style=leaderboard -->        the two tables `robcomp report` prints
      <!-- table: q where=[data=gaussians]        a Markdown table, one row per leaderboard row
      compress = #/compress                       (in file order), one line per column:
      clean = 100*#/clean_accuracy fmt=.1f        HEADER = EXPRESSION [fmt=SPEC], where a
      -->                                         reference with no file (#/key) is the row's
      ...generated...
      <!-- /table -->

``python scripts/docs_numbers.py`` rewrites the text between markers in place;
``--check`` changes nothing and exits 1, listing every place where text and file disagree (2
for a marker that cannot be evaluated: a missing file, key or row). ``--refresh NAME`` runs a
shipped config (``quickstart`` runs ``robcomp quickstart``) into a temporary folder and keeps
its ``leaderboard.json``, ``shifts.json`` (``shifts.csv``'s rows, typed) and a ``run.json``
(the command, commit, wall time, machine load) under ``docs/results/NAME/``.
``tests/test_docs_numbers.py`` runs the check on the repository.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import math
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The tables are rendered by this checkout's robcomp, whatever else is installed.
sys.path.insert(0, str(ROOT / "src"))
RESULTS = Path("docs/results")

INLINE = re.compile(r"<!-- n: (?P<spec>.*?) -->(?P<text>.*?)<!-- /n -->")
ALIAS = re.compile(r"<!-- data: (?P<name>\w+) = (?P<path>\S+) -->")
TABLE = re.compile(r"<!-- table: (?P<spec>.*?)-->\n(?P<text>.*?)<!-- /table -->", re.DOTALL)
CLAIM = re.compile(r"<!-- claim: (?P<spec>.*?) -->")
OPENERS = ("<!-- n:", "<!-- table:")
# FILE#POINTER: a pointer segment is a [selector] or a token without spaces, slashes,
# parentheses, commas or brackets (so `min(a#/x, b#/y)` and `(a#/x - b#/y)` split as meant).
REF = re.compile(r"(?P<file>(?:[\w.][\w.\-/]*)?)#(?P<pointer>(?:/(?:\[[^\]]*\]|[^\s/(),\[\]]*))*)")
OPTION = re.compile(r"\s+(?P<key>fmt|style|where)=(?P<value>\S+)")
BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}  # fmt: skip
COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}  # fmt: skip
FUNCTIONS: dict[str, Callable[..., Any]] = {"abs": abs, "min": min, "max": max, "round": round}
# The leaderboard as `robcomp report` prints it, at a fixed width so the text never depends
# on the terminal that regenerated it.
LEADERBOARD_WIDTH = 250


class MarkerError(Exception):
    """A marker that cannot be evaluated: bad syntax, missing file, key or row."""


@dataclass(frozen=True)
class Mismatch:
    """One place where the text between markers differs from what the files give."""

    where: str
    marker: str
    text: str
    expected: str

    def __str__(self) -> str:
        if "\n" not in self.text + self.expected:
            return (
                f"{self.where}: {self.marker} text says {self.text!r}, file gives {self.expected!r}"
            )
        diff = difflib.unified_diff(
            self.text.splitlines(), self.expected.splitlines(), "text", "file", lineterm="", n=0
        )
        return f"{self.where}: {self.marker}\n" + "\n".join(f"  {line}" for line in diff)


# ---------------------------------------------------------------------------------- pointers


def _unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def _matches(field: Any, wanted: str) -> bool:
    """A selector value matches the field as a string; a component spec also by its name."""
    if isinstance(field, dict) and "name" in field and str(field["name"]) == wanted:
        return True
    return str(field) == wanted


def _pairs(selector: str, where: str) -> list[tuple[str, str]]:
    """``key=value,...`` (the inside of a ``[...]`` selector) as pairs."""
    pairs = []
    for part in selector.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise MarkerError(f"{where}: selector [{selector}] needs key=value pairs")
        pairs.append((_unescape(key.strip()), value.strip()))
    return pairs


def _selected(item: Any, pairs: list[tuple[str, str]]) -> bool:
    return isinstance(item, dict) and all(k in item and _matches(item[k], v) for k, v in pairs)


def _select(items: list[Any], selector: str, where: str) -> Any:
    pairs = _pairs(selector, where)
    found = [item for item in items if _selected(item, pairs)]
    if len(found) != 1:
        what = "no element" if not found else f"{len(found)} elements"
        raise MarkerError(f"{where}: {what} of the list match [{selector}] (one must)")
    return found[0]


def resolve(document: Any, pointer: str, where: str = "") -> Any:
    """The value at ``pointer`` (RFC 6901, plus ``[key=value,...]`` selectors) in ``document``.

    Raises:
        MarkerError: a segment names a missing key, an index out of range, or a selector that
            matches no element or several.
    """
    if pointer and not pointer.startswith("/"):
        raise MarkerError(f"{where}: pointer {pointer!r} must start with '/'")
    value, walked = document, ""
    for raw in pointer.split("/")[1:]:
        here = f"{where}#{walked or '/'}"
        if isinstance(value, list) and raw.startswith("[") and raw.endswith("]"):
            value = _select(value, raw[1:-1], here)
        elif isinstance(value, list):
            if not raw.isdigit() or int(raw) >= len(value):
                raise MarkerError(f"{here}: no element {raw!r} in a list of {len(value)}")
            value = value[int(raw)]
        elif isinstance(value, dict):
            key = _unescape(raw)
            if key not in value:
                keys = ", ".join(sorted(map(str, value)))
                raise MarkerError(f"{here}: no key {key!r} (keys: {keys})")
            value = value[key]
        else:
            raise MarkerError(f"{here}: {value!r} has no member {raw!r}")
        walked += "/" + raw
    return value


class Files:
    """Results files read once each, relative to the repository root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def load(self, path: str, where: str = "") -> Any:
        """The parsed JSON file at ``path``; ``where`` (page:line) prefixes any error."""
        prefix = f"{where}: " if where else ""
        if path not in self._cache:
            file = self.root / path
            if not file.is_file():
                hint = ""
                if Path(path).parts[:2] == RESULTS.parts:
                    preset = Path(path).parts[2]
                    hint = f" (write it: python scripts/docs_numbers.py --refresh {preset})"
                raise MarkerError(f"{prefix}{path}: no such results file{hint}")
            try:
                self._cache[path] = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise MarkerError(f"{prefix}{path}: not JSON ({e})") from e
        return self._cache[path]


# ------------------------------------------------------------------------------- expressions


def _evaluate(node: ast.AST, values: dict[str, Any], source: str) -> Any:
    """Arithmetic and comparisons only: numbers, strings, references, + - * /, unary -,
    FUNCTIONS, < <= > >= == != and ``and``/``or``."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values, source)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
        return node.value
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _number(_evaluate(node.operand, values, source), source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left = _number(_evaluate(node.left, values, source), source)
        right = _number(_evaluate(node.right, values, source), source)
        return BINARY[type(node.op)](left, right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FUNCTIONS
        and not node.keywords
    ):
        args = [_number(_evaluate(a, values, source), source) for a in node.args]
        return FUNCTIONS[node.func.id](*args)
    if isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
        operands = [_evaluate(n, values, source) for n in (node.left, *node.comparators)]
        return all(COMPARE[type(op)](a, b) for op, a, b in zip(node.ops, operands, operands[1:]))
    if isinstance(node, ast.BoolOp):
        results = [_evaluate(v, values, source) for v in node.values]
        return all(results) if isinstance(node.op, ast.And) else any(results)
    raise MarkerError(f"{source!r}: only numbers, strings, FILE#POINTER, + - * / ( ), "
                      f"{', '.join(FUNCTIONS)}, comparisons, and, or are allowed")  # fmt: skip


def _number(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MarkerError(f"{source!r}: {value!r} is not a number")
    return value


def evaluate(
    expression: str,
    files: Files,
    aliases: dict[str, str],
    row: Any = None,
    where: str = "",
) -> Any:
    """The value of a marker's expression. A reference without a file (``#/key``) reads
    ``row``; one whose file is an alias reads the aliased file."""
    values: dict[str, Any] = {}

    def substitute(match: re.Match[str]) -> str:
        name, pointer = match["file"], match["pointer"]
        if not name:
            if row is None:
                raise MarkerError(f"{where}: {match[0]!r} names no file (only a table column may)")
            document, label = row, "row"
        else:
            path = aliases.get(name, name)
            document, label = files.load(path, where), path
        value = resolve(document, pointer, f"{where}: {label}")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise MarkerError(f"{where}: {label}#{pointer} is {value} in the file (not measured)")
        key = f"_v{len(values)}"
        values[key] = value
        return f" {key} "

    code = REF.sub(substitute, expression).strip()
    if not values:
        raise MarkerError(f"{where}: {expression!r} reads no file (FILE#POINTER)")
    if code in values:  # one reference alone may be a string (a name, a label)
        return values[code]
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError as e:
        raise MarkerError(f"{where}: cannot parse {expression!r} ({e.msg})") from e
    return _evaluate(tree, values, f"{where}: {expression}")


def explain(expression: str, files: Files, aliases: dict[str, str]) -> str:
    """``expression`` with every reference replaced by its value, to show why a claim fails."""

    def value(match: re.Match[str]) -> str:
        path = aliases.get(match["file"], match["file"])
        found = resolve(files.load(path), match["pointer"], path)
        return format(found, ".4g") if isinstance(found, float) else repr(found)

    return REF.sub(value, expression)


def render(value: Any, spec: str, where: str = "") -> str:
    """``value`` formatted with the Python format spec ``spec``; an integral float with an
    integer spec (``d``, ``,d``) is formatted as the integer it is."""
    if isinstance(value, dict) and "name" in value:  # a component spec shows as its name
        value = value["name"]
    if spec.endswith("d") and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError) as e:
        raise MarkerError(f"{where}: cannot format {value!r} with fmt={spec} ({e})") from e


def split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``expression`` and its ``key=value`` options (fmt, style, where) from a marker's text."""
    options = {m["key"]: m["value"] for m in OPTION.finditer(" " + spec)}
    return OPTION.sub("", " " + spec).strip(), options


# ------------------------------------------------------------------------------------ blocks


def leaderboard_text(rows: list[dict[str, Any]]) -> str:
    """The cost and robustness tables `robcomp report` prints, as plain fixed-width text (no
    captions: the page around them explains the columns)."""
    from rich.console import Console

    from robcomp.report.tables import leaderboard_table

    group = leaderboard_table(rows)
    for table in group.renderables:
        table.caption = None  # type: ignore[union-attr]
    console = Console(file=io.StringIO(), width=LEADERBOARD_WIDTH, record=True, color_system=None)
    console.print(group)
    lines = console.export_text(styles=False).splitlines()
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def markdown_table(
    rows: list[Any],
    columns: list[tuple[str, str, str]],
    files: Files,
    aliases: dict[str, str],
    where: str,
) -> str:
    """A Markdown table: one row per element of ``rows``, one column per (header, expression,
    fmt); a ``#/key`` reference reads the row."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for i, row in enumerate(rows):
        cells = []
        for header, expression, spec in columns:
            here = f"{where} row {i} column {header!r}"
            cells.append(render(evaluate(expression, files, aliases, row, here), spec, here))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _columns(lines: list[str], where: str) -> list[tuple[str, str, str]]:
    columns = []
    for line in lines:
        header, eq, rest = line.partition(" = ")
        if not eq:
            raise MarkerError(f"{where}: column line {line!r} is not 'HEADER = EXPRESSION'")
        expression, options = split_options(rest)
        columns.append((header.strip(), expression, options.get("fmt", "")))
    return columns


def table_text(spec: str, files: Files, aliases: dict[str, str], where: str) -> str:
    """The generated text of a table block (without the markers)."""
    head, *column_lines = [line.strip() for line in spec.strip().splitlines() if line.strip()]
    source, options = split_options(head)
    file, _, pointer = source.partition("#")
    path = aliases.get(file, file)
    rows = resolve(files.load(path, where), pointer, f"{where}: {path}")
    if not isinstance(rows, list):
        raise MarkerError(f"{where}: {source} is not a list of rows (a leaderboard.json is)")
    if "where" in options:
        selector = options["where"]
        if not (selector.startswith("[") and selector.endswith("]")):
            raise MarkerError(f"{where}: where={selector} must be [key=value,...]")
        pairs = _pairs(selector[1:-1], where)
        rows = [row for row in rows if _selected(row, pairs)]
        if not rows:
            raise MarkerError(f"{where}: no row of {path} matches where={selector}")
    style = options.get("style", "markdown")
    if style == "leaderboard":
        if column_lines:
            raise MarkerError(f"{where}: style=leaderboard takes no column lines")
        return "```\n" + leaderboard_text(rows) + "\n```"
    if style != "markdown":
        raise MarkerError(f"{where}: style={style}: choose markdown or leaderboard")
    if not column_lines:
        raise MarkerError(f"{where}: a Markdown table needs column lines 'HEADER = EXPRESSION'")
    return markdown_table(rows, _columns(column_lines, where), files, aliases, where)


# ---------------------------------------------------------------------------------- documents


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)[^`\n].*?\1")


def code_regions(text: str) -> list[tuple[int, int]]:
    """Offsets of fenced code blocks and (one-line) code spans: markers there are examples in
    the page, not markers, and are left alone."""
    regions, opened, offset = [], None, 0
    prose: list[tuple[int, str]] = []
    for line in text.splitlines(keepends=True):
        fence = FENCE.match(line)
        if opened is None and fence:
            opened = (offset, fence[1])
        elif opened is not None:
            mark = opened[1]
            if (
                fence
                and fence[1][0] == mark[0]
                and len(fence[1]) >= len(mark)
                and not line[fence.end() :].strip()
            ):
                regions.append((opened[0], offset + len(line)))
                opened = None
        else:
            prose.append((offset, line))
        offset += len(line)
    if opened is not None:  # an unclosed fence runs to the end of the page
        regions.append((opened[0], len(text)))
    regions += [
        (at + m.start(), at + m.end()) for at, line in prose for m in CODE_SPAN.finditer(line)
    ]
    return regions


def _inside(regions: list[tuple[int, int]], offset: int) -> bool:
    return any(a <= offset < b for a, b in regions)


def aliases_of(text: str, name: str) -> dict[str, str]:
    """The page's ``<!-- data: NAME = PATH -->`` aliases. Each stands on a line of its own
    after a blank line or another marker line, so that it never splits a paragraph."""
    found: dict[str, str] = {}
    code = code_regions(text)
    for m in ALIAS.finditer(text):
        if _inside(code, m.start()):
            continue
        where = f"{name}:{_line(text, m.start())}"
        if m["name"] in found and found[m["name"]] != m["path"]:
            raise MarkerError(f"{where}: alias {m['name']!r} defined twice")
        lines = text[: m.start()].split("\n")
        alone = lines[-1] == "" and text[m.end() : m.end() + 1] in ("\n", "")
        if not alone or (len(lines) > 1 and lines[-2].strip() and not lines[-2].startswith("<!--")):
            raise MarkerError(
                f"{where}: an alias must stand alone on its line, after a blank line "
                "(inside a paragraph it would split it)"
            )
        found[m["name"]] = m["path"]
    return found


def _unclosed(text: str, name: str) -> Iterator[str]:
    """Openers that no complete marker covers: an unclosed marker would silently stay stale."""
    covered = [(m.start(), m.end()) for pattern in (INLINE, TABLE) for m in pattern.finditer(text)]
    covered += code_regions(text)
    for opener in OPENERS:
        for m in re.finditer(re.escape(opener), text):
            if not _inside(covered, m.start()):
                yield f"{name}:{_line(text, m.start())}: {opener} ... has no closing marker"


# What may precede a block on its line: indentation, list items' markers, block quotes.
_LINE_START = re.compile(r"^(?:\s|[-*+>]|\d+[.)])*$")


def _starts_line(text: str, offset: int) -> bool:
    """Whether only indentation or container markers precede ``offset`` on its line: there an
    HTML comment starts an HTML block and splits the paragraph (CommonMark)."""
    return bool(_LINE_START.match(text[text.rfind("\n", 0, offset) + 1 : offset]))


def regenerate(text: str, name: str, files: Files) -> tuple[str, list[Mismatch], list[str]]:
    """``text`` with every marker's content regenerated, the places that changed, and the
    errors (markers that could not be evaluated, whose text is left as it was)."""
    errors = list(_unclosed(text, name))
    try:
        aliases = aliases_of(text, name)
    except MarkerError as e:
        return text, [], [*errors, str(e)]
    mismatches: list[Mismatch] = []

    def replace(kind: str, source: str) -> Callable[[re.Match[str]], str]:
        code = code_regions(source)

        def fill(m: re.Match[str]) -> str:
            if _inside(code, m.start()):
                return m[0]
            where = f"{name}:{_line(source, m.start())}"
            try:
                if kind == "n":
                    if _starts_line(source, m.start()):
                        # CommonMark would start an HTML block there and split the paragraph
                        raise MarkerError(
                            f"{where}: an inline marker must not start a line; "
                            "move a word in front of it"
                        )
                    expression, options = split_options(m["spec"])
                    value = evaluate(expression, files, aliases, where=where)
                    new = render(value, options.get("fmt", ""), where)
                    head, tail = f"<!-- n: {m['spec']} -->", "<!-- /n -->"
                else:
                    new = table_text(m["spec"], files, aliases, where) + "\n"
                    head, tail = f"<!-- table: {m['spec']}-->\n", "<!-- /table -->"
            except MarkerError as e:
                errors.append(str(e))
                return m[0]
            if new != m["text"]:
                mismatches.append(Mismatch(where, head.splitlines()[0], m["text"], new))
            return head + new + tail

        return fill

    code = code_regions(text)
    for m in CLAIM.finditer(text):
        if not _inside(code, m.start()):
            failed = _broken_claim(m, text, name, files, aliases)
            errors += [failed] if failed else []
    out = INLINE.sub(replace("n", text), text)
    # inline values never add lines, so a table's line number is the same in the text as read
    out = TABLE.sub(replace("table", out), out)
    return out, mismatches, errors


def _broken_claim(
    m: re.Match[str], text: str, name: str, files: Files, aliases: dict[str, str]
) -> str | None:
    """Why a ``<!-- claim: EXPRESSION -->`` (a statement of the prose, checked against the
    files) fails, or None when it holds."""
    where = f"{name}:{_line(text, m.start())}"
    try:
        if _starts_line(text, m.start()):
            raise MarkerError(f"{where}: a claim must not start a line; put it after its sentence")
        holds = evaluate(m["spec"], files, aliases, where=where)
        if not isinstance(holds, bool):
            raise MarkerError(f"{where}: claim {m['spec']!r} is {holds!r}, not true or false")
    except MarkerError as e:
        return str(e)
    if holds:
        return None
    shown = explain(m["spec"], files, aliases)
    return (
        f"{where}: the text's claim no longer holds for its files: {m['spec']} ({shown}); "
        "reword the sentence before it, and the claim"
    )


def documents(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/ except the results folder."""
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    docs = root / "docs"
    if docs.is_dir():
        results = root / RESULTS
        pages += sorted(p for p in docs.rglob("*.md") if results not in p.parents)
    return pages


def run(root: Path, check: bool) -> tuple[list[Mismatch], list[str]]:
    """Regenerate (or with ``check`` only compare) every page; the mismatches and errors."""
    files = Files(root)
    mismatches: list[Mismatch] = []
    errors: list[str] = []
    for page in documents(root):
        text = page.read_text()
        new, changed, failed = regenerate(text, str(page.relative_to(root)), files)
        mismatches += changed
        errors += failed
        if not check and not failed and new != text:
            page.write_text(new)
    return mismatches, errors


# ---------------------------------------------------------------------------------- refreshing


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _keep_shift_rows(store: Path, path: Path) -> None:
    """``shifts.csv`` as JSON with its values' types (set sizes ``n``, grid specs): one row
    per cell and shifted split, read from the run's store; no file when nothing was shifted."""
    from robcomp.experiments.store import ResultStore
    from robcomp.report.tables import shift_rows

    rows = shift_rows(ResultStore(store).runs()) if store.is_file() else []
    if rows:
        path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    else:
        path.unlink(missing_ok=True)


def refresh(root: Path, name: str, config: str | None, overrides: list[str]) -> Path:
    """Run shipped config ``config`` (default ``name``; ``quickstart`` is `robcomp quickstart`)
    into a temporary folder and keep its leaderboard under ``docs/results/name/``.

    A later refresh of the same name without ``config``/``overrides`` reuses those recorded in
    ``run.json``, so one command reruns exactly what produced the numbers."""
    target = root / RESULTS / name
    recorded = target / "run.json"
    if config is None and not overrides and recorded.is_file():
        previous = json.loads(recorded.read_text())
        config, overrides = previous.get("config"), list(previous.get("set", []))
    config = config or name
    sets = [a for kv in overrides for a in ("--set", kv)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"robcomp-{name}-") as tmp:
        out = Path(tmp) / "run"
        command = ["quickstart"] if config == "quickstart" else ["run", config]
        argv = [sys.executable, "-c", "from robcomp.cli import app; app()", *command]
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run([*argv, "--out", str(out), *sets], env=env, check=True)
        wall = time.perf_counter() - start
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "report" / "leaderboard.json", target / "leaderboard.json")
        _keep_shift_rows(out / "results.sqlite", target / "shifts.json")
        html = out / "report" / "report.html"
        record = {
            "command": f"robcomp {' '.join(command)} --out OUT" + "".join(
                f" --set '{kv}'" for kv in overrides
            ),
            "config": config,
            "set": overrides,
            "commit": _git(root, "rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git(root, "status", "--porcelain", "--", "src")),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 1),
            "cpus": os.cpu_count(),
            "load_1min_before": round(load_before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
            "report_html_bytes": html.stat().st_size if html.is_file() else None,
        }  # fmt: skip
        recorded.write_text(json.dumps(record, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if any text disagrees"
    )
    parser.add_argument(
        "--refresh", metavar="NAME", help="rerun a shipped config into docs/results/NAME/ first"
    )
    parser.add_argument("--config", help="with --refresh: the shipped config to run [NAME]")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="with --refresh: an override for the run (as robcomp run --set)",
    )  # fmt: skip
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.refresh:
        print(f"wrote {refresh(args.root, args.refresh, args.config, args.overrides)}")
    mismatches, errors = run(args.root, check=args.check)
    for m in mismatches:
        print(m)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 2
    if args.check and mismatches:
        print(f"{len(mismatches)} place(s) disagree with their files; "
              "run python scripts/docs_numbers.py to rewrite them")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
