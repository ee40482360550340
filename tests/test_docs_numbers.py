"""Numbers in the docs come from results files: the markers of scripts/docs_numbers.py, and the
check that the repository's README.md and docs/*.md agree with their files."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_numbers", ROOT / "scripts/docs_numbers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_numbers"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


dn = _load()

BENCH = {
    "apgd": {"speedup": 4.5321, "n": 500.0},
    "a/b": {"c": 1},
    "rows": [
        {"compress": "none", "acc": 0.962, "size": 22328},
        {"compress": "int8", "acc": 0.96, "size": 6360, "spec": {"name": "int8", "bits": 8}},
        {"compress": "l1", "acc": None, "size": 7176},
    ],
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A tiny repository: one results file, an empty README."""
    (tmp_path / "bench/results").mkdir(parents=True)
    (tmp_path / "bench/results/a.json").write_text(json.dumps(BENCH))
    (tmp_path / "README.md").write_text("")
    return tmp_path


def check(root: Path, text: str) -> tuple[str, list[Any], list[str]]:
    return dn.regenerate(text, "page.md", dn.Files(root))


# ------------------------------------------------------------------------------ pointers


def test_pointer_walks_keys_indices_escapes_and_selectors() -> None:
    assert dn.resolve(BENCH, "/apgd/speedup") == 4.5321
    assert dn.resolve(BENCH, "/rows/1/acc") == 0.96
    assert dn.resolve(BENCH, "/a~1b/c") == 1  # RFC 6901: ~1 is a slash inside a key
    assert dn.resolve(BENCH, "/rows/[compress=int8]/size") == 6360
    assert dn.resolve(BENCH, "/rows/[spec=int8]/compress") == "int8"  # a spec by its name
    assert dn.resolve(BENCH, "/rows/[compress=int8,size=6360]/acc") == 0.96


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ("/apgd/speed", "no key 'speed' (keys: n, speedup)"),
        ("/rows/7", "no element '7' in a list of 3"),
        ("/rows/[compress=fp16]/acc", "no element of the list match [compress=fp16]"),
        ("/rows/[compress=none,compress=int8]", "no element of the list match"),
        ("/apgd/n/x", "has no member 'x'"),
        ("apgd", "must start with '/'"),
    ],
)
def test_pointer_errors_say_what_is_missing(pointer: str, message: str) -> None:
    with pytest.raises(dn.MarkerError, match=re.escape(message)):
        dn.resolve(BENCH, pointer)


def test_selector_matching_several_rows_is_an_error() -> None:
    with pytest.raises(dn.MarkerError, match=re.escape("2 elements of the list match")):
        dn.resolve([{"k": 1}, {"k": 1}], "/[k=1]")


# --------------------------------------------------------------------------- expressions


def test_expressions_combine_references(repo: Path) -> None:
    files = dn.Files(repo)
    f = "bench/results/a.json"
    got = dn.evaluate(f"100*({f}#/rows/0/acc - {f}#/rows/1/acc)", files, {})
    assert got == pytest.approx(0.2)
    assert dn.evaluate(f"{f}#/rows/1/size / {f}#/rows/0/size", files, {}) == 6360 / 22328
    assert dn.evaluate(f"max({f}#/rows/0/acc, {f}#/rows/1/acc)", files, {}) == 0.962
    assert dn.evaluate("q#/rows/[compress=int8]/compress", files, {"q": f}) == "int8"
    assert dn.evaluate("-#/acc", files, {}, row={"acc": 0.5}) == -0.5


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("bench/results/a.json#/rows/2/acc", "is None in the file (not measured)"),
        ("bench/results/nope.json#/x", "bench/results/nope.json: no such results file"),
        ("docs/results/demo/leaderboard.json#/0", "--refresh demo"),
        ("bench/results/a.json#/rows/0/compress * 2", "'none' is not a number"),
        ("__import__('os') + bench/results/a.json#/apgd/n", "only numbers, strings, FILE#POINTER"),
        ("1 + 2", "reads no file"),
        ("#/acc", "names no file"),
    ],
)
def test_expression_errors_are_clear(repo: Path, expression: str, message: str) -> None:
    with pytest.raises(dn.MarkerError, match=re.escape(message)):
        dn.evaluate(expression, dn.Files(repo), {}, where="page.md:3")


def test_render_formats_integral_floats_as_integers() -> None:
    assert dn.render(500.0, "d") == "500"
    assert dn.render(4.5321, ".2f") == "4.53"
    assert dn.render("int8", "") == "int8"
    assert dn.render({"name": "l1-filter", "ratio": 0.5}, "") == "l1-filter"
    with pytest.raises(dn.MarkerError, match=re.escape("cannot format 4.5 with fmt=d")):
        dn.render(4.5, "d", "page.md:1")


# ------------------------------------------------------------------------------- markers


def test_inline_marker_is_rewritten_and_reported(repo: Path) -> None:
    text = "Speed-up\n<!-- n: bench/results/a.json#/apgd/speedup fmt=.2f -->4.50<!-- /n -->x.\n"
    text = "It is " + text.replace("\n<!--", " <!--")
    new, mismatches, errors = check(repo, text)
    assert errors == []
    assert new == text.replace("4.50<", "4.53<")
    (m,) = mismatches
    assert (m.where, m.text, m.expected) == ("page.md:1", "4.50", "4.53")
    assert "text says '4.50', file gives '4.53'" in str(m)
    again, mismatches, errors = check(repo, new)
    assert (again, mismatches, errors) == (new, [], [])


def test_aliases_name_a_file_for_the_whole_page(repo: Path) -> None:
    text = (
        "<!-- data: b = bench/results/a.json -->\n\nn is <!-- n: b#/apgd/n fmt=d -->0<!-- /n -->.\n"
    )
    new, _, errors = check(repo, text)
    assert errors == [] and "-->500<!-- /n -->" in new


def test_a_broken_marker_is_an_error_with_its_line_and_keeps_its_text(repo: Path) -> None:
    text = "a\nb is <!-- n: bench/results/missing.json#/x -->7<!-- /n -->\n"
    new, mismatches, errors = check(repo, text)
    assert new == text and mismatches == []
    assert errors == ["page.md:2: bench/results/missing.json: no such results file"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x\n<!-- n: bench/results/a.json#/apgd/n -->500<!-- /n --> y", "must not start a line"),
        ("- <!-- n: bench/results/a.json#/apgd/n -->500<!-- /n --> y", "must not start a line"),
        ("a line\n<!-- data: b = bench/results/a.json -->\n", "must stand alone on its line"),
        ("x is <!-- n: bench/results/a.json#/apgd/n -->500 and on", "has no closing marker"),
        ("<!-- table: bench/results/a.json#/rows\nc = #/compress\n-->\n", "has no closing"),
    ],
)
def test_markers_that_would_break_the_markdown_are_errors(
    repo: Path, text: str, message: str
) -> None:
    _, _, errors = check(repo, text)
    assert any(message in e for e in errors), errors


def test_markers_in_code_are_examples_and_left_alone(repo: Path) -> None:
    example = "<!-- n: bench/results/missing.json#/x -->7<!-- /n -->"
    text = (
        f"Write `{example}` or `<!-- data: z = nowhere.json -->` for a value:\n\n"
        f"```markdown\nit is {example}\n<!-- table: nowhere.json -->\n```\n\n"
        f"~~~~\n```\n{example}\n~~~~\n"
    )
    assert check(repo, text) == (text, [], [])
    text += f"Here it is {example}.\n"
    _, _, errors = check(repo, text)
    assert errors == ["page.md:12: bench/results/missing.json: no such results file"]


def test_claims_are_checked_against_the_files(repo: Path) -> None:
    f = "bench/results/a.json"
    holds = f"int8 is smaller<!-- claim: {f}#/rows/1/size < {f}#/rows/0/size --> and"
    assert check(repo, holds + " fine") == (holds + " fine", [], [])
    names = f'first<!-- claim: {f}#/rows/0/compress == "none" and {f}#/apgd/n >= 500 -->'
    assert check(repo, names)[2] == []
    wrong = f"int8 is larger<!-- claim: {f}#/rows/1/size > 2 * {f}#/rows/0/size -->"
    (error,) = check(repo, "a\n" + wrong)[2]
    assert error.startswith("page.md:2: the text's claim no longer holds")
    assert "(6360 > 2 * 22328)" in error and "reword the sentence" in error
    (error,) = check(repo, f"x<!-- claim: {f}#/apgd/n + 1 -->")[2]
    assert "is 501.0, not true or false" in error
    (error,) = check(repo, f"<!-- claim: {f}#/apgd/n > 1 --> x")[2]
    assert "must not start a line" in error


def test_markdown_table_block(repo: Path) -> None:
    text = (
        "<!-- table: bench/results/a.json#/rows where=[compress=none]\n"
        "model = #/compress\n"
        "clean, % = 100*#/acc fmt=.1f\n"
        "-->\n"
        "stale\n"
        "<!-- /table -->\n"
    )
    new, mismatches, errors = check(repo, text)
    assert errors == [] and len(mismatches) == 1
    table = "| model | clean, % |\n|---|---|\n| none | 96.2 |\n"
    assert new == text.replace("stale\n", table)


def test_table_block_errors(repo: Path) -> None:
    text = "<!-- table: bench/results/a.json#/apgd\nx = #/n\n-->\n<!-- /table -->\n"
    _, _, errors = check(repo, text)
    assert errors == ["page.md:1: bench/results/a.json#/apgd is not a list of rows "
                      "(a leaderboard.json is)"]  # fmt: skip
    text = "<!-- table: bench/results/a.json#/rows\nx #/n\n-->\n<!-- /table -->\n"
    _, _, errors = check(repo, text)
    assert "is not 'HEADER = EXPRESSION'" in errors[0]


def test_leaderboard_block_is_the_reports_text() -> None:
    """style=leaderboard prints the two tables `robcomp report` prints, captions left out."""
    rows = json.loads((ROOT / "docs/results/quickstart/leaderboard.json").read_text())
    text = dn.leaderboard_text(rows)
    assert "robcomp leaderboard: cost" in text and "robcomp leaderboard: robustness" in text
    assert all(r["compress"] in text for r in rows)
    assert "accuracy in %" not in text  # the caption
    assert all(line == line.rstrip() for line in text.splitlines())


# -------------------------------------------------------------------- the command line


def test_main_exit_codes_and_rewrite(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = repo / "README.md"
    (repo / "docs/results/x").mkdir(parents=True)
    (repo / "docs/results/x/notes.md").write_text("<!-- n: nowhere#/x -->1<!-- /n -->")
    readme.write_text("It is <!-- n: bench/results/a.json#/apgd/n fmt=d -->5<!-- /n -->.\n")
    (repo / "docs/page.md").write_text(
        "Also <!-- n: bench/results/a.json#/apgd/n -->500.0<!-- /n -->"
    )
    assert dn.main(["--root", str(repo), "--check"]) == 1
    assert "README.md:1" in capsys.readouterr().out
    assert "-->5<" in readme.read_text()  # --check changes nothing
    assert dn.main(["--root", str(repo)]) == 0
    assert dn.main(["--root", str(repo), "--check"]) == 0  # docs/results/ pages are not docs
    assert "-->500<" in readme.read_text()
    readme.write_text("It is <!-- n: bench/results/a.json#/apgd/nn -->5<!-- /n -->.\n")
    assert dn.main(["--root", str(repo), "--check"]) == 2
    assert "no key 'nn'" in capsys.readouterr().err


def test_refresh_keeps_the_leaderboard_and_how_it_was_made(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[0] == "git":
            return subprocess.CompletedProcess(argv, 0, stdout="abc123\n", stderr="")
        report = Path(argv[argv.index("--out") + 1]) / "report"
        report.mkdir(parents=True)
        (report / "leaderboard.json").write_text('[{"compress": "none"}]')
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(dn.subprocess, "run", fake_run)
    target = dn.refresh(repo, "demo-sim", "kwon2021-onmanifold", ["seed=1"])
    assert json.loads((target / "leaderboard.json").read_text()) == [{"compress": "none"}]
    record = json.loads((target / "run.json").read_text())
    assert record["config"] == "kwon2021-onmanifold" and record["set"] == ["seed=1"]
    assert record["commit"] == "abc123" and record["wall_seconds"] >= 0
    assert not (target / "shifts.json").exists()  # the fake run scored no shifted data
    run = next(c for c in calls if c[0] != "git")
    assert run[3:5] == ["run", "kwon2021-onmanifold"] and run[-2:] == ["--set", "seed=1"]
    calls.clear()
    dn.refresh(repo, "demo-sim", None, [])  # the recorded recipe, rerun as it was
    run = next(c for c in calls if c[0] != "git")
    assert run[3:5] == ["run", "kwon2021-onmanifold"] and run[-2:] == ["--set", "seed=1"]


# ------------------------------------------------------------------------ the repository


def test_repository_docs_agree_with_their_results_files() -> None:
    """Every number between markers in README.md and docs/*.md is what its file gives; when
    this fails, run `python scripts/docs_numbers.py` (or refresh the results it names)."""
    mismatches, errors = dn.run(ROOT, check=True)
    assert errors == []
    assert [str(m) for m in mismatches] == []


def test_the_quickstart_section_is_generated() -> None:
    """The quickstart tables of the README and of its docs page come from the kept leaderboard,
    not from a paste."""
    for page, numbers in (("README.md", 5), ("docs/quickstart.md", 15)):
        text = (ROOT / page).read_text()
        assert "<!-- data: q = docs/results/quickstart/leaderboard.json -->" in text
        assert "<!-- table: q style=leaderboard -->" in text
        start = text.index("What the quickstart shows")
        end = text.find("\n## ", start)
        assert text[start : end if end > 0 else None].count("<!-- n: ") >= numbers, page


def test_a_number_changed_by_hand_is_caught(tmp_path: Path) -> None:
    """A copy of the repository's README whose first generated number is typed over."""
    for path in ("bench/results", "docs/results"):
        shutil.copytree(ROOT / path, tmp_path / path)
    readme = (ROOT / "README.md").read_text()
    m = dn.INLINE.search(readme)
    assert m is not None
    tampered = readme[: m.start("text")] + m["text"] + "1" + readme[m.end("text") :]
    (tmp_path / "README.md").write_text(tampered)
    mismatches, errors = dn.run(tmp_path, check=True)
    assert errors == []
    (found,) = mismatches
    assert (found.text, found.expected) == (m["text"] + "1", m["text"])


def test_markers_stay_invisible_when_rendered() -> None:
    """CommonMark (markdown-it, which rich already installs) sees every inline marker as
    inline HTML inside its paragraph, and aliases and table markers as HTML blocks of their
    own: nothing of them shows, and no paragraph is cut in two."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark").enable("table")
    for page in dn.documents(ROOT):
        text = page.read_text()
        tokens = parser.parse(text)
        blocks = [t.content for t in tokens if t.type == "html_block"]
        assert not [b for b in blocks if "<!-- n:" in b or "<!-- claim:" in b], page
        inline = [
            c.content
            for t in tokens
            if t.type == "inline"
            for c in t.children or []
            if c.type == "html_inline" and c.content.startswith("<!-- n:")
        ]
        code = dn.code_regions(text)
        expected = [m for m in dn.INLINE.finditer(text) if not dn._inside(code, m.start())]
        assert len(inline) == len(expected), page
