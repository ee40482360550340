"""The robcomp command line. Thin: each command parses, calls one public function, prints."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

# Nothing here imports torch: a mistake in an experiment file is reported before it loads.
from robcomp.config import ConfigError, parse_data_spec, parse_override, parse_spec
from robcomp.registry import RegistryError, code_paths

app = typer.Typer(
    help="robcomp: how much robustness does compression cost, and which method keeps the most?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
# A missing dataset (robcomp.data.DatasetNotFound) is a FileNotFoundError.
USER_ERRORS = (ConfigError, RegistryError, FileNotFoundError, ValueError)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set train.epochs=3 (repeatable)."
    ),
]


def user_errors(fn: F) -> F:
    """Show mistakes a user can fix as one red line on stderr and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            # One line, whatever the message holds (a library's multi-line text); escaped:
            # rich would read "[attacks]" in a message as markup and drop it.
            message = escape(" ".join(str(err).split()))
            errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each epoch and cell.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # module:callable models import from the working directory, as `python -m` would.
    ctx.with_resource(code_paths(Path.cwd()))


def _run_and_report(
    source: Path | dict[str, Any],
    overrides: list[str],
    out: Path,
    executor: str = "local",
    ray_address: str | None = None,
    append: bool = False,
    store: str | None = None,
    artifacts: str | None = None,
) -> None:
    from robcomp import progress
    from robcomp.experiments import STORE_NAME, load_experiment, run_experiment
    from robcomp.experiments.executors import make_executor
    from robcomp.report import write_report

    experiment = load_experiment(source, overrides)
    header = f"[bold]{escape(experiment.name)}[/]: {len(experiment.cells)} cells -> {out}"
    start = time.perf_counter()
    try:
        with progress.display(console):
            options: dict[str, Any] = {"artifacts": artifacts}
            if executor == "ray":
                options["address"] = ray_address
            executor_ = make_executor(executor, **options)
            summary = run_experiment(
                experiment, out, executor_, append=append, store=store,
                started=lambda: console.print(header, soft_wrap=True),
            )  # fmt: skip
    except KeyboardInterrupt:
        # Finished cells are committed one by one, so nothing done is lost.
        console.print("interrupted; rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    console.print(
        f"ran {summary.ran} cells, skipped {summary.skipped} already done, "
        f"{len(summary.failed)} failed, in {time.perf_counter() - start:.1f} s"
    )
    for failed in summary.failed:
        # The first line says what went wrong; the traceback is in the log (-v) and the store.
        first = (failed.error or "").splitlines()[0] if failed.error else ""
        console.print(f"[red]cell {failed.cell_id} failed:[/] {escape(first)}", highlight=False)
    store_ = store or experiment.store or out / STORE_NAME
    status_target = _status_target(store_, out)
    if summary.elsewhere:
        console.print(f"{len(summary.elsewhere)} cells were claimed by another run: "
                      f"`robcomp status {status_target}` shows them",
                      highlight=False, soft_wrap=True)  # fmt: skip
    transfer = summary.transfer
    if transfer is not None:
        console.print(f"transfer: {transfer.stored} entries stored, {transfer.skipped} already "
                      f"done, {len(transfer.failed)} failed")  # fmt: skip
        for line in transfer.failed:
            console.print(f"[red]transfer {escape(line.splitlines()[0])}[/]", highlight=False)
    files = write_report(store_, out / "report", html=True)
    _print_leaderboard(store_)
    console.print("report: " + ", ".join(str(f) for f in files.paths()))
    if summary.unfinished:
        _print_unfinished(summary.unfinished, status_target)
        raise typer.Exit(UNFINISHED_EXIT)
    if summary.failed or (transfer is not None and transfer.failed):
        raise typer.Exit(1)


UNFINISHED_EXIT = 3  # the run ended with cells that other live runs still hold


def _status_target(store: Path | str, out: Path) -> str:
    """What to pass ``robcomp status`` for this run's store: its URL (without a password)
    when it is a database server's, else the output folder."""
    from robcomp.experiments.store import STORE_NAME, safe_url, store_url

    if "://" in str(store):
        return safe_url(store_url(store))
    return str(out if Path(store) == out / STORE_NAME else store)


def _print_unfinished(cells: list[str], status_target: str) -> None:
    """Name the cells other runs still hold, and how to finish them."""
    import shlex
    import sys

    rerun = shlex.join(["robcomp", *sys.argv[1:]])
    console.print(
        f"[yellow]{len(cells)} cells are not done: other live runs hold them:[/] "
        f"{', '.join(cells)}. `robcomp status {status_target}` shows who; once those runs "
        f"end, `{rerun}` runs whatever they left and reports the whole grid",
        highlight=False, soft_wrap=True,
    )  # fmt: skip


def _print_leaderboard(store_path: Path | str) -> None:
    """The leaderboard, then a sentence for every cell whose numbers may be masked."""
    from robcomp.experiments import ResultStore
    from robcomp.report import leaderboard_rows, leaderboard_table

    rows = leaderboard_rows(ResultStore(store_path, read_only=True))
    tables = leaderboard_table(rows)
    # A table wider than the terminal is printed whole (the terminal wraps it) rather than cut.
    unbounded = Console(width=10_000)
    needed = unbounded.measure(tables, options=unbounded.options).maximum
    wide = Console(width=max(console.width, min(needed, 200)))
    wide.print(tables)
    for row in rows:
        if row.get("masking_flags") not in (None, "none"):
            masking = escape(str(row["masking"]))
            console.print(f"[red]cell {row['cell_id'][:8]}:[/] {masking}", highlight=False)


StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Results store URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
        "[default: the file's store:, else OUT/results.sqlite].",
    ),
]
AppendOption = Annotated[
    bool,
    typer.Option(help="Add to an OUT that holds another experiment (their leaderboards merge)."),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(help="Where cells run: auto (CUDA when present), cpu, cuda, cuda:1 [file's]."),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="Intra-op CPU threads per cell [auto: 1 for tiny models, else the free cores]."
    ),
]


def _operational(device: str | None, threads: int | None) -> list[str]:
    """``--device``/``--threads`` as overrides: where and how fast, never which result."""
    return [f"{k}={v}" for k, v in (("device", device), ("threads", threads)) if v is not None]


# ``quickstart --quick``: the same pipeline and the same attack libraries (Square, DDN) on three
# cells with a few epochs, points and steps, so a fresh install is checked in well under a minute
# (CI runs it). Its numbers say nothing about the methods.
QUICK_OVERRIDES = (
    "name=quickstart-quick",
    "train.epochs=2",
    "finetune.epochs=1",
    "evaluate.limit=32",
    "evaluate.black_box_queries=20",
    "evaluate.diagnostics=false",  # 32 points are too few for its statistics
    "evaluate.latency_repeats=2",
    "evaluate.attacks=[{name: pgd, eps: 0.1, steps: 3}, {name: apgd-ce, eps: 0.1, steps: 5}, "
    "{name: square, eps: 0.1, queries: 20}, {name: ddn, eps: 0.5, steps: 5}]",
    "grid.compress=[{name: none}, {name: magnitude, sparsity: 0.8}, {name: int8}]",
)


@app.command()
@user_errors
def quickstart(
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder [default: robcomp-quickstart, -quick with --quick]."),
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Delete earlier results in OUT first.")] = False,
    quick: Annotated[
        bool, typer.Option(help="A tiny run (3 cells, 2 epochs) that checks the install.")
    ] = False,
    append: AppendOption = False,
    set_: SetOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train a tiny CNN on digits; prune, filter-prune, distill and int8-quantize it; attack each
    with PGD, APGD-CE, Square and DDN under the gradient-masking checks; report (~2 min)."""
    out = out or Path("robcomp-quickstart-quick" if quick else "robcomp-quickstart")
    if fresh and out.exists():
        shutil.rmtree(out)
    text = resources.files("robcomp").joinpath("configs/quickstart.yaml").read_text()
    overrides = [*(QUICK_OVERRIDES if quick else ()), *(set_ or []), *_operational(device, threads)]
    _run_and_report(yaml.safe_load(text), overrides, out, append=append)


@app.command()
@user_errors
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML (base config + grid).")],
    out: Annotated[Path | None, typer.Option(help="Output folder [default: runs/NAME].")] = None,
    set_: SetOption = None,
    executor: Annotated[
        str, typer.Option(help="Where cells run: local (this process) or ray.")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address: auto joins the one this machine is part of, "
            "ray://HOST:10001 connects through Ray Client (default: a local Ray)."
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            help="Folder for trained baselines, compressed models and shifted data, "
            "seen by every node of a cluster (NFS, a PVC, an s3fs/gcsfuse mount) "
            "(default: OUT/cache)."
        ),
    ] = None,
    append: AppendOption = False,
    store: StoreOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Let checkpoints the cells load import the module:callable their spec.json "
            "names (runs that code); the same as --set trust_code=true.",
        ),
    ] = False,
) -> None:
    """Run every cell of an experiment file (or of a shipped config: `robcomp list configs`);
    finished cells are skipped, so reruns resume."""
    from robcomp.experiments.schema import check_experiment

    file = _experiment_file(file)
    trust = ["trust_code=true"] if trust_code else []
    overrides = [*(set_ or []), *_operational(device, threads), *trust]
    name = check_experiment(file, overrides)  # the file's own mistakes, before torch loads
    if out is None:
        out = Path("runs") / name
    _run_and_report(file, overrides, out, executor, ray_address, append, store, artifacts=artifacts)


@app.command()
@user_errors
def train(
    file: Annotated[
        Path | None, typer.Argument(help="Optional experiment YAML to start from.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Dataset name.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or module:callable.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    out: Annotated[Path, typer.Option(help="Checkpoint folder.")] = Path("robcomp-model"),
    set_: SetOption = None,
    device: DeviceOption = None,
) -> None:
    """Train one model and save it as a checkpoint (safetensors + spec + history + config)."""
    from robcomp import progress
    from robcomp.config import load_yaml, set_dotted, to_dict
    from robcomp.data import get
    from robcomp.evaluate import accuracy
    from robcomp.experiments.runner import build_model
    from robcomp.experiments.spec import resolve
    from robcomp.models import resolve_device, save_checkpoint
    from robcomp.train import fit

    raw: dict[str, Any] = load_yaml(file) if file else {}
    raw.pop("grid", None)
    for key, value in (("data.name", data), ("model.name", model), ("train.epochs", epochs)):
        if value is not None:
            raw = set_dotted(raw, key, value)
    for text in [*(set_ or []), *_operational(device, None)]:
        raw = set_dotted(raw, *parse_override(text))
    cfg = resolve(raw, str(file or "train"))
    splits = get(cfg.data, seed=cfg.seed).to(resolve_device(cfg.device))
    console.print(splits.summary())
    net, spec = build_model(cfg, splits)
    with progress.display(console):
        history = fit(net, splits, cfg.train, seed=cfg.seed)
    save_checkpoint(net, out, spec)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "history.json").write_text(json.dumps(history.as_dict(), indent=2))
    console.print(
        f"test accuracy {100 * accuracy(net, splits.test):.2f}% "
        f"(best epoch {history.best_epoch}); saved to {out}"
    )


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``0.49,0.48,0.45`` or ``[0.49, 0.48, 0.45]`` -> a tuple of floats."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.strip("[] ").split(","))
    except ValueError:
        raise ConfigError(f"{option}: expected numbers separated by commas, got {text!r}") from None


DEFAULT_ATTACK = "pgd:eps=0.1"  # PGD-10, L-inf, on [0, 1] inputs
DEFAULT_LIMIT = 1000


@app.command()
@user_errors
def evaluate(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="Folder written by `robcomp train` (or --model with --weights)."),
    ] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME:key=value,... e.g. pgd:eps=8/255,steps=20 (repeatable).",
            show_default=f"{DEFAULT_ATTACK}: PGD-10, L-inf, eps 0.1",
        ),
    ] = None,
    shift: Annotated[
        list[str] | None,
        typer.Option(
            help="Distribution shift NAME:key=value,... e.g. corruptions:severities=[1,3,5] "
            "(repeatable; `robcomp list shifts`): accuracy on each shifted test split and its "
            "mCE against the model itself."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset: a name, NAME:key=value,... (npz:path=test.npz,split=test) or a YAML "
            "mapping [default: the checkpoint's]."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model for a foreign --weights file: registered, timm:, torchvision: "
            "or module:callable."
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Weights file (safetensors or a PyTorch state dict) for --model."),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(help="Per-channel mean the weights were trained with, e.g. 0.49,0.48,0.45."),
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Per-channel std the weights were trained with.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="Model option KEY=VALUE for --model (repeatable).")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Attack the first LIMIT test points (0: all of them).")
    ] = DEFAULT_LIMIT,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Let the checkpoint's spec.json import the module:callable it names (runs "
            "that code; only for checkpoints whose code you trust).",
        ),
    ] = False,
    device: DeviceOption = None,
) -> None:
    """Clean and robust accuracy (and shifted accuracy with --shift) of a saved model (a
    checkpoint, or --model with a foreign --weights file) on the test split, threat model
    checked, through the same pipeline as `robcomp run`."""
    import tempfile

    from robcomp import progress
    from robcomp.compress import COMPRESSORS
    from robcomp.config import build, build_component
    from robcomp.experiments import CellConfig
    from robcomp.experiments.pipeline import Variant, evaluate_variant
    from robcomp.models import resolve_device

    net, splits, data_spec, source = _model_and_data(
        checkpoint, data, model, weights, mean, std, option, seed, trust_code
    )
    where = resolve_device(device or "auto")
    raw = {
        "seed": seed,
        "data": data_spec if isinstance(data_spec, dict) else {"name": data_spec},
        "evaluate": {
            "attacks": [parse_spec(a) for a in attack or [DEFAULT_ATTACK]],
            "shifts": [parse_spec(s) for s in shift or []],
            "limit": limit or None, "diagnostics": False, "latency_batch_sizes": [],
        },
    }  # fmt: skip
    cfg = build(CellConfig, raw, "robcomp evaluate")
    _check_libraries(cfg)
    points = min(len(splits.test), limit or len(splits.test))
    console.print(
        f"scored on the test split of {escape(splits.name)}: {len(splits.test)} points clean, "
        f"{points} attacked ({escape(splits.summary())}); --limit sets how many are attacked",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    none = build_component(COMPRESSORS, "none", "compress")
    with tempfile.TemporaryDirectory(prefix="robcomp-evaluate-") as tmp, progress.display(console):
        variant = Variant(
            config=cfg, baseline=net.to(where), compressor=none, cache=Path(tmp, "cache"),
            folder=Path(tmp), reuse=False,
        )  # fmt: skip
        result = evaluate_variant(variant, splits.to(where))
    _print_attacks(f"{source} on {splits.name}", result.evaluation, len(splits.test))
    for i, stages in result.evaluation.stages.items():
        _print_breakdown(result.evaluation.results[i], stages)
    _print_shifts(result.metrics)


def _model_and_data(
    checkpoint: Path | None,
    data: str | None,
    model: str | None,
    weights: Path | None,
    mean: str | None,
    std: str | None,
    option: list[str] | None,
    seed: int,
    trust_code: bool,
) -> tuple[Any, Any, Any, str]:
    """(model, splits, data spec, what to call the model) of `robcomp evaluate`'s arguments."""
    from robcomp.api import model_from_weights
    from robcomp.config import load_yaml
    from robcomp.data import get
    from robcomp.models import load_checkpoint

    if weights is not None and checkpoint is None:
        if model is None or data is None:
            raise ConfigError("--weights needs --model (its architecture) and --data")
        data_spec = parse_data_spec(data)
        splits = get(data_spec, seed=seed)
        options = dict(parse_override(o) for o in option or [])
        net = model_from_weights(
            model, weights, splits, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
            options=options, seed=seed,
        )  # fmt: skip
        return net, splits, data_spec, str(weights)
    if checkpoint is not None and weights is None:
        net, _ = load_checkpoint(checkpoint, trust_code=trust_code)
        config_path = checkpoint / "config.yaml"
        saved = load_yaml(config_path)["data"] if config_path.is_file() else None
        spec = parse_data_spec(data) if data else saved
        if spec is None:
            raise ConfigError(f"{checkpoint}: no config.yaml to tell the dataset; pass --data NAME")
        return net, get(spec, seed=seed), spec, str(checkpoint)
    raise ConfigError("pass a checkpoint folder, or --model and --weights (not both)")


def _check_libraries(cfg: Any) -> None:
    """Before the first attack runs, not halfway through the table: every attack's library
    is installed and every shift is a registered one."""
    from robcomp.attacks.base import missing_library
    from robcomp.config import build_component
    from robcomp.evaluate import SHIFTS

    for atk in cfg.evaluate.build_attacks("--attack"):
        if message := missing_library(atk):
            raise ConfigError(f"--attack: {message}")
    for i, spec in enumerate(cfg.evaluate.shifts):
        build_component(SHIFTS, dict(spec), f"--shift[{i}]")


def _print_attacks(title: str, evaluation: Any, n: int) -> None:
    table = Table(title=title)
    for col in ("attack", "eps", "points", "clean %", "robust %", "median norm", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("none", "0", str(n), f"{100 * evaluation.clean_accuracy:.2f}", "", "", "")
    for r in evaluation.results:
        table.add_row(
            r.attack, f"{r.eps:.4g}", str(r.n), f"{100 * r.clean_accuracy:.2f}",
            f"{100 * r.robust_accuracy:.2f}", f"{r.median_norm:.4g}", f"{r.seconds:.1f}",
        )  # fmt: skip
    console.print(table)


def _print_shifts(metrics: list[Any]) -> None:
    """Accuracy on each shifted test split, then each shift's summary (mCE, mean accuracy)."""
    per_split = [m for m in metrics if m.shift and m.severity and not m.attack]
    summaries = [m for m in metrics if m.shift and not m.severity and not m.attack]
    if not per_split and not summaries:
        return
    table = Table(title="shifted test splits")
    for col in ("shift", "severity", "metric", "value"):
        table.add_column(col, justify="right")
    for m in [*per_split, *summaries]:
        value = f"{100 * m.value:.2f} %" if m.name.endswith("accuracy") else f"{m.value:.4g}"
        table.add_row(m.shift, str(m.severity or ""), m.name, value)
    console.print(table)


def _print_breakdown(result: Any, stages: list[Any]) -> None:
    """AutoAttack's per-stage account: initial accuracy, then each stage's broken points,
    robust accuracy after it and seconds (as the official code's verbose log)."""
    table = Table(title=f"{result.attack} eps={result.eps:.4g} on {result.n} points")
    for col in ("stage", "points broken", "robust % after", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("initial (clean)", "", f"{100 * result.clean_accuracy:.2f}", "")
    for s in stages:
        table.add_row(s.attack, str(s.broke), f"{100 * s.robust_accuracy:.2f}", f"{s.seconds:.1f}")
    console.print(table)


@app.command()
@user_errors
def report(
    folder: Annotated[Path, typer.Argument(help="Output folder of `robcomp run`.")],
    store: StoreOption = None,
    html: Annotated[
        bool,
        typer.Option(
            "--html", help="Also write report.html: one self-contained page, figures inlined."
        ),
    ] = False,
) -> None:
    """Print the leaderboard and write CSV, JSON and the figures into FOLDER/report (with
    --html, report.html too)."""
    from robcomp.experiments import STORE_NAME
    from robcomp.report import write_report

    store_path: Path | str = store or folder / STORE_NAME
    if store is None and not folder.joinpath(STORE_NAME).is_file():
        raise FileNotFoundError(f"{store_path}: no results here; run `robcomp run FILE` first")
    files = write_report(store_path, folder / "report", html=html)
    _print_leaderboard(store_path)
    console.print("report: " + ", ".join(str(f) for f in files.paths()))


@app.command()
@user_errors
def status(
    target: Annotated[
        str,
        typer.Argument(
            help="A run's output folder, a .sqlite file or a store URL "
            "(sqlite:///PATH, postgresql://USER@HOST/DB)."
        ),
    ],
    experiment: Annotated[
        str | None, typer.Option(help="Only this experiment's cells (its name).")
    ] = None,
) -> None:
    """Done (who ran it), running (owner, since), failed (error) and pending cells, the live
    runs and the time left; reads the store only."""
    from robcomp.experiments.status import grid_status

    state = grid_status(target, experiment)
    table = Table(title=f"{escape(state.store)}: {len(state.cells)} cells")
    for col in ("state", "cell", "grid values", "owner / error", "since / seconds"):
        table.add_column(col, overflow="fold")  # values wrap, never cut with an ellipsis
    colors = {"done": "green", "running": "cyan", "failed": "red", "pending": "dim"}
    for cell in sorted(state.cells, key=lambda c: _STATE_ORDER.index(c.state)):
        values = ", ".join(f"{k}={v}" for k, v in cell.grid_values.items())
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cell.since))
            if cell.since is not None
            else (f"{cell.seconds:.1f} s" if cell.seconds is not None else "")
        )
        table.add_row(
            f"[{colors[cell.state]}]{cell.state}[/]", cell.cell_id[:12], escape(values),
            escape(cell.error or cell.owner or ""), when,
        )  # fmt: skip
    _print_whole(table)
    counts = state.counts()
    line = ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {state.workers} live run(s)"
    if counts["running"] + counts["pending"] and state.eta_seconds is not None:
        line += f"; about {_duration(state.eta_seconds)} left ({state.mean_seconds:.1f} s a cell)"
    console.print(line, highlight=False, soft_wrap=True)


def _print_whole(table: Table) -> None:
    """``table`` as wide as its contents when stdout is not a terminal (a pipe, a file, a
    log), so a value is never cut or wrapped there; a terminal's width otherwise."""
    if console.is_terminal:
        console.print(table)
        return
    unbounded = Console(width=10_000)
    needed = unbounded.measure(table, options=unbounded.options).maximum
    Console(width=max(needed, 80), file=console.file).print(table)


_STATE_ORDER = ("running", "failed", "pending", "done")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


KINDS = (
    "datasets", "models", "attacks", "compressors", "objectives", "shifts", "presets", "configs",
)  # fmt: skip


def shipped_configs() -> dict[str, Path]:
    """Experiment files that ship with robcomp, by name (file name without ``.yaml``)."""
    folder = Path(str(resources.files("robcomp").joinpath("configs")))
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))}


def _experiment_file(file: Path) -> Path:
    """``file`` itself, or the shipped config of that name when no such file exists."""
    if file.exists():
        return file
    shipped = shipped_configs().get(file.name.removesuffix(".yaml"))
    if shipped is None:
        raise FileNotFoundError(
            f"{file}: no such experiment file, and no shipped config of that name "
            f"(shipped: {', '.join(shipped_configs())})"
        )
    return shipped


@app.command(name="list")
@user_errors
def list_(
    kind: Annotated[str | None, typer.Argument(help=f"One of: {', '.join(KINDS)}.")] = None,
) -> None:
    """List registered components (what an experiment file can name)."""
    from robcomp.attacks import ATTACKS
    from robcomp.attacks.presets import preset_names
    from robcomp.compress import COMPRESSORS
    from robcomp.data import DATASETS
    from robcomp.evaluate import SHIFTS
    from robcomp.models import MODELS
    from robcomp.registry import Lookup
    from robcomp.train import OBJECTIVES

    registries: tuple[Lookup[object], ...] = (
        DATASETS, MODELS, ATTACKS, COMPRESSORS, OBJECTIVES, SHIFTS,
    )  # fmt: skip
    names = {k: r.names() for k, r in zip(KINDS, registries)} | {
        "presets": preset_names(),
        "configs": list(shipped_configs()),
    }
    if kind is not None and kind not in names:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    for name, members in names.items():
        if kind in (None, name):
            console.print(f"[bold]{name}[/]: {', '.join(members)}")


if __name__ == "__main__":  # python -m robcomp.cli runs the command too (not only imports it)
    app(prog_name="robcomp")
