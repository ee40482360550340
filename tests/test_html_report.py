"""The self-contained HTML report: one file, nothing fetched, the right numbers in its tables,
the Pareto front named in the answer, and (in a real headless Chromium) no console errors, no
external request, every image decoded and tables that sort on a click. The store is written by
hand (no training)."""

from __future__ import annotations

import base64
import json
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from robcomp.experiments.store import Metric, ResultStore
from robcomp.report.html import HTML_NAME, pareto_front, write_html

LABEL = "corruptions[fog+gaussian_noise]-cifar"
# cell id -> (compress spec, compressor label, params removed, bytes on disk, sparse bytes,
#             MACs, clean, worst linf@0.1, pgd linf@0.1, mean corruption acc, mCE)
CELLS: dict[str, tuple[dict[str, Any], str, float, float, float, float, float, float, float,
                       float, float]] = {
    "dense": ({"name": "none"}, "none", 0.0, 40000, 38000, 1e6, 0.95, 0.40, 0.45, 0.70, 1.0),
    "mag": ({"name": "magnitude", "sparsity": 0.8}, "magnitude-0.8", 0.8, 40000, 9000, 1e6,
            0.93, 0.30, 0.32, 0.66, 1.2),
    "int8": ({"name": "int8"}, "int8", 0.0, 10000, 10000, 1e6, 0.94, 0.38, 0.41, 0.69, 1.05),
    "l1": ({"name": "l1-filter", "sparsity": 0.5}, "l1-filter-0.5", 0.5, 20000, 19000, 4e5,
           0.90, 0.39, 0.42, 0.60, 1.4),
}  # fmt: skip
FLAGGED = "l1"  # its black-box check is raised


def _record(store: ResultStore, cell_id: str) -> None:
    spec, label, rate, size, sparse, macs, clean, worst, pgd, corr, mce = CELLS[cell_id]
    metrics = [
        Metric("compression_rate", rate), Metric("size_bytes", size),
        Metric("sparse_bytes", sparse), Metric("macs", macs), Metric("params", 10000),
        Metric("nonzero_params", round(10000 * (1 - rate))),
        Metric("latency_ms_b1", size / 1e4), Metric("threads", 1), Metric("load_1min", 0.5),
        Metric("clean_accuracy", clean),
        Metric("robust_accuracy", pgd, "pgd10-linf", 0.1, norm="linf"),
        Metric("robust_accuracy", worst + 0.1, "square-linf", 0.1, norm="linf"),
        Metric("worst_robust_accuracy", worst, "worst-linf", 0.1, norm="linf"),
        Metric("clean_accuracy", clean - 0.3, shift="fog", severity=2),
        Metric("clean_accuracy", clean - 0.2, shift="gaussian_noise", severity=2),
        Metric("mean_corruption_accuracy", corr, shift=LABEL),
        Metric("mce", mce, shift=LABEL),
        Metric("zero_gradients", 0.0),
        Metric("black_box_weaker", 1.0 if cell_id == FLAGGED else 0.0),
    ]  # fmt: skip
    diagnostics = [
        {"check": "zero_gradients", "raised": False, "value": 0.0, "message": "nonzero"},
        {"check": "black_box_weaker", "raised": cell_id == FLAGGED, "value": 0.1,
         "message": f"square beats pgd on {cell_id}"},
    ]  # fmt: skip
    info = {
        "compressor": label,
        "device": "cpu",
        "data": "digits: 100 train / 10 val / 50 test",
        "diagnostics": diagnostics,
        "masking": "POSSIBLE GRADIENT MASKING" if cell_id == FLAGGED else "no sign",
        "worst_case": {
            "primary": {"norm": "linf", "eps": 0.1},
            "threat_models": [
                {
                    "norm": "linf",
                    "eps": 0.1,
                    "robust_accuracy": worst,
                    "attacks": ["pgd10-linf", "square-linf"],
                }
            ],
        },
        "baseline": {
            "history": {
                "epochs": [
                    {"epoch": 1, "loss": 1.5, "train_accuracy": 0.5, "val_accuracy": 0.6},
                    {"epoch": 2, "loss": 0.7, "train_accuracy": 0.8, "val_accuracy": 0.81},
                ]
            }
        },
        "shifts": {
            LABEL: [
                {
                    "shift": "fog",
                    "severity": 2,
                    "family": "weather",
                    "n": 50,
                    "accuracy": clean - 0.3,
                    "baseline_accuracy": 0.65,
                },
                {
                    "shift": "gaussian_noise",
                    "severity": 2,
                    "family": "noise",
                    "n": 50,
                    "accuracy": clean - 0.2,
                    "baseline_accuracy": 0.75,
                },
            ]
        },
        "record": {"method": label, "size_bytes": size},
    }
    store.record(
        cell_id=cell_id, experiment="html", grid_values={"compress": spec}, info=info,
        config={"data": {"name": "digits"}, "model": {"name": "tiny_cnn"}, "compress": spec,
                "train": {"epochs": 2}, "seed": 0, "threads": None,
                "evaluate": {"shifts": [{"name": "corruptions",
                                         "corruptions": ["fog", "gaussian_noise"]}]}},
        metrics=metrics, seconds=2.0,
    )  # fmt: skip


PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The store, a failed cell beside the finished ones, a PNG figure, and the page."""
    root = tmp_path_factory.mktemp("html")
    store = ResultStore(root / "results.sqlite")
    for cell_id in CELLS:
        _record(store, cell_id)
    store.record(
        cell_id="broken", experiment="html", grid_values={}, info={}, seconds=0.1,
        config={"data": {"name": "digits"}, "model": {"name": "tiny_cnn"},
                "compress": {"name": "magnitude"}, "seed": 0},
        metrics=[], error="RuntimeError: the compressor broke\ntraceback ...",
    )  # fmt: skip
    folder = root / "report"
    folder.mkdir()
    (folder / "training_curves.png").write_bytes(PNG_1x1)
    path = write_html(root / "results.sqlite", folder)
    return path, path.read_text(encoding="utf-8")


class _Tables(HTMLParser):
    """Every table's header and body cells by the table's id, every img src, every
    src/href attribute, and every section id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, list[Any]]] = {}
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.sections: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "section":
            self.sections.append(a.get("id") or "")
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = {"head": [], "rows": []}
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._table and self._row:
            table = self.tables[self._table]
            if table["head"]:
                table["rows"].append(self._row)
            else:
                table["head"] = self._row
        elif tag == "table":
            self._table = None


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def _by_model(table: dict[str, list[Any]]) -> dict[str, dict[str, str]]:
    return {row[0]: dict(zip(table["head"], row)) for row in table["rows"]}


def test_one_file_that_needs_no_network(built: tuple[Path, str]) -> None:
    path, page = built
    assert sorted(p.name for p in path.parent.iterdir()) == [HTML_NAME, "training_curves.png"]
    parsed = _parse(page)
    # every src and href is a data: URI or an anchor in the page; no script or style file
    assert parsed.links and all(v.startswith(("data:", "#")) for v in parsed.links), parsed.links
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page)
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    ids = re.findall(r'\sid="([^"]*)"', page)
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[\w-]+", i) for i in ids)
    assert parsed.imgs and all(src.startswith("data:image/") for src in parsed.imgs)
    svgs = [s for s in parsed.imgs if s.startswith("data:image/svg+xml;base64,")]
    pngs = [s for s in parsed.imgs if s.startswith("data:image/png;base64,")]
    # the folder's PNG, byte for byte; one trade-off SVG per cost axis
    assert [base64.b64decode(s.partition(",")[2]) for s in pngs] == [PNG_1x1]
    assert len(svgs) == 5  # bytes, sparse bytes, parameters removed, MACs, latency
    assert all(b"<svg" in base64.b64decode(s.partition(",")[2]) for s in svgs)


def test_sections_in_order_answer_first(built: tuple[Path, str]) -> None:
    sections = _parse(built[1]).sections
    assert sections == [
        "summary", "tradeoffs", "cost", "robustness", "worst-case", "shifts", "figures",
        "masking", "cells", "environment",
    ]  # fmt: skip


def test_answer_names_the_pareto_front_per_threat_model_and_shift(built: tuple[Path, str]) -> None:
    table = _parse(built[1]).tables
    # the answers table has no id; find its rows in the summary section's text instead
    summary = built[1].split('id="summary"')[1].split("</section>")[0]
    rows = re.findall(r"<tr class=\"([\w-]+)\">(.*?)</tr>", summary, re.S)
    measures = [(kind, re.sub(r"<[^>]+>", " ", body)) for kind, body in rows]
    assert [k for k, _ in measures] == ["threat-model", "shift", "shift"]
    worst = measures[0][1]
    # bytes: int8 10 kB 38 % -> l1 20 kB 39 % -> dense 40 kB 40 %; magnitude (40 kB, 30 %)
    # is dominated
    assert "robust accuracy, worst case linf eps=0.1" in worst
    front = re.findall(r"(\w[\w.-]*) \((\d+\.\d) kB, (\d+\.\d) %\)", worst)
    assert front[:3] == [("int8", "10.0", "38.0"), ("l1-filter-0.5", "20.0", "39.0"),
                         ("none", "40.0", "40.0")]  # fmt: skip
    assert "int8: 38.0 % in 10.0 kB (3.8 points per kB)" in worst  # the most per byte
    mce = measures[2][1]
    assert "lower is better" in mce and "none (100.0 %)" in mce  # the lowest mCE
    # models are named by their compressor, never by cell id ("dense" is the none cell's id)
    assert [r[0] for r in table["table-robustness"]["rows"]] == ["none", "l1-filter-0.5", "int8",
                                                          "magnitude-0.8"]  # fmt: skip
    assert "Pareto front" in built[1].split('id="tradeoffs"')[0]


def test_tables_hold_the_stored_numbers(built: tuple[Path, str]) -> None:
    tables = _parse(built[1]).tables
    cost = _by_model(tables["table-cost"])
    assert cost["int8"]["bytes"] == "10.0 kB" and cost["int8"]["% of dense bytes"] == "25.0"
    assert cost["magnitude-0.8"]["params removed %"] == "80.0"
    assert cost["magnitude-0.8"]["sparse bytes"] == "9.0 kB"
    assert cost["l1-filter-0.5"]["MACs"] == "400.00k"
    robust = _by_model(tables["table-robustness"])
    assert robust["l1-filter-0.5"]["clean %"] == "90.0"
    assert robust["l1-filter-0.5"]["worst linf@0.1 %"] == "39.0"
    assert robust["magnitude-0.8"]["pgd10-linf@0.1 %"] == "32.0"
    assert robust["none"]["mCE %"] == "100.0"
    assert robust["l1-filter-0.5"]["masking flags"] == "black_box_weaker"
    assert robust["int8"]["masking flags"] == "ok"
    worst = _by_model(tables["table-worst-case"])
    assert worst["int8"]["linf eps=0.1 worst %"] == "38.0"
    assert worst["int8"]["linf eps=0.1 strongest single"] == "pgd10-linf 41.0"
    shift = tables["table-shift-0"]
    assert shift["head"][:4] == ["split", "severity", "family", "n"]
    fog = dict(zip(shift["head"], shift["rows"][0]))
    assert (fog["split"], fog["severity"], fog["l1-filter-0.5"]) == ("fog", "2", "60.0")
    assert fog["dense baseline"] == "65.0"
    masking = _by_model(tables["table-masking"])
    assert masking["l1-filter-0.5"]["black_box_weaker"] == "raised"
    assert masking["none"]["black_box_weaker"] == "ok"


def test_masking_guide_cells_and_environment(built: tuple[Path, str]) -> None:
    page = built[1]
    masking = page.split('id="masking"')[1].split("</section>")[0]
    assert "square beats pgd on l1" in masking  # the stored message of the raised check
    assert "What to do:" in masking and "zero_gradients" in masking
    cells = page.split('id="cells"')[1].split("</section>")[0]
    assert cells.count("<details>") == 5  # every cell, the failed one too
    assert "RuntimeError: the compressor broke" in cells
    assert "sparsity: 0.8" in cells  # the resolved config as YAML
    assert "baseline training" in cells and ">81.0<" in cells  # validation accuracy in %
    env = page.split('id="environment"')[1].split("</section>")[0]
    assert "Recorded in the store" in env and "Measured by the process" in env
    assert "cpu (4 cells)" in env  # the stored device of the finished cells
    import platform

    assert platform.python_version() in env


def test_first_column_stays_in_view(built: tuple[Path, str]) -> None:
    """Wide tables scroll sideways under a sticky first column with its own background (or
    the scrolled cells would show through it)."""
    rules = re.findall(r"([^{}]*)\{([^}]*)\}", built[1])
    sticky = [
        body for selector, body in rules
        if "td:first-child" in selector and re.search(r"position:\s*sticky", body)
    ]  # fmt: skip
    assert sticky and all(re.search(r"left:\s*0", b) and "background" in b for b in sticky)


def test_a_shift_with_another_datasets_constants_says_so(built: tuple[Path, str]) -> None:
    page = built[1]
    section = page[page.index(f"<h3>{LABEL}</h3>") :]
    note = re.search(r'<p class="note">([^<]*)</p>', section)
    assert note and section.index(note.group(0)) < section.index("<table")
    text = unescape(note.group(1))
    assert "CIFAR-10-C's corruption constants" in text and "on digits" in text


def test_pareto_front_directions() -> None:
    pts = [("a", 1.0, 0.5), ("b", 2.0, 0.4), ("c", 3.0, 0.7), ("d", 3.0, 0.6)]
    assert pareto_front(pts) == ["a", "c"]
    # lower-is-better value (mCE): the smallest first, each lower than every smaller one
    assert pareto_front(pts, higher_is_better=False) == ["a", "b"]
    # parameters removed: more removed is smaller, so c (most removed, most robust) is the
    # whole front; with a more robust a, a joins it
    assert pareto_front(pts, cost_lower_is_smaller=False) == ["c"]
    pts[0] = ("a", 1.0, 0.9)
    assert pareto_front(pts, cost_lower_is_smaller=False) == ["c", "a"]


@pytest.mark.slow
def test_robcomp_report_html_writes_the_page_last(tmp_path: Path) -> None:
    from robcomp.cli import app

    run = tmp_path / "run"
    _record(ResultStore(run / "results.sqlite"), "int8")
    result = CliRunner().invoke(app, ["report", str(run), "--html"])
    assert result.exit_code == 0, result.output
    folder = run / "report"
    page = (folder / HTML_NAME).read_text()
    table = _parse(page).tables["table-robustness"]
    assert [r[:2] for r in table["rows"]] == [["tiny_cnn, int8", "94.0"]]
    # every figure the report drew is inlined, byte for byte
    pngs = sorted(folder.glob("*.png"))
    assert pngs and page.count("data:image/png;base64,") == len(pngs)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in page
    listed = result.output.replace("\n", "")
    assert listed.rstrip().endswith(HTML_NAME)  # written after the other files


# ---------------------------------------------------------------------------- a real browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.skip(f"{path} is absent (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # no Selenium Manager lookup or download
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)  # fmt: skip
    except WebDriverException as err:
        pytest.skip(f"chromium did not start: {err.msg}")
    yield driver
    driver.quit()


def _column(driver: Any, table: str, header: str) -> list[str]:
    from selenium.webdriver.common.by import By

    heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, f"#{table} thead th")]
    i = heads.index(header) + 1
    cells = driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr td:nth-child({i})")
    return [c.get_attribute("textContent").strip() for c in cells]


def test_the_page_in_headless_chromium(built: tuple[Path, str], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(built[0].as_uri())
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete)"
        )
    )
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    requested = [
        json.loads(e["message"])["message"]["params"]["request"]["url"]
        for e in browser.get_log("performance")
        if '"Network.requestWillBeSent"' in e["message"]
    ]
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested
    widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(widths) == 6 and all(w > 0 for w in widths), widths

    # sort the robustness table by clean accuracy: ascending, then descending
    header = next(
        h for h in browser.find_elements(By.CSS_SELECTOR, "#table-robustness thead th")
        if h.text == "clean %"
    )  # fmt: skip
    before = _column(browser, "table-robustness", "clean %")
    header.click()
    ascending = _column(browser, "table-robustness", "clean %")
    assert ascending == sorted(before, key=float) and ascending != before
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert _column(browser, "table-robustness", "clean %") == sorted(
        before, key=float, reverse=True
    )
    models = _column(browser, "table-robustness", "model")
    assert models[0] == "none"  # the rows moved whole: the 95 % row is the dense model's
    first = "return getComputedStyle(document.querySelector('#table-robustness tbody td'))"
    assert browser.execute_script(first + ".position") == "sticky"

    # the cost-axis picker shows one trade-off figure at a time, bytes first
    def shown() -> list[str]:
        figures = browser.find_elements(By.CSS_SELECTOR, "figure.axis-figure")
        return [f.get_attribute("data-axis") for f in figures if f.is_displayed()]

    assert shown() == ["size_bytes"]
    browser.find_element(By.CSS_SELECTOR, '.picker button[data-axis="macs"]').click()
    assert shown() == ["macs"]
