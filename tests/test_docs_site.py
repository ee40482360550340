"""The docs site: the README stays a front page, the component pages are generated from the
registries (so every registered component is documented with its options), and every page the
nav or the README names exists. `mkdocs build --strict` itself runs in .ci/run."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_pages", ROOT / "scripts/docs_pages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_pages"] = module
    spec.loader.exec_module(module)
    return module


dp = _load()


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md: {len(lines)} lines; move reference to docs/"


@pytest.mark.parametrize("page", ["README.md", "docs/install.md"])
def test_the_cpu_torch_command_installs_the_pinned_versions(page: str) -> None:
    """The CPU-only install asks PyTorch's CPU index for exactly the versions pyproject pins."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2
    command = f"pip install {' '.join(pins)} --index-url https://download.pytorch.org/whl/cpu"
    assert command in (ROOT / page).read_text()


def test_the_readme_test_command_is_the_fast_tier_of_ci() -> None:
    """The README's test command is the one .ci/run runs as its fast tier."""
    readme = (ROOT / "README.md").read_text()
    install = r"^python -m pip install -q -e '\.\[dev\]' && "
    commands = re.findall(install + r"(python -m pytest .*)$", readme, re.MULTILINE)
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert commands[0] in ci


def test_every_registered_component_has_a_section_with_its_options() -> None:
    pages = dp.pages()
    for kind, registry in dp.registries().items():
        page = pages[f"components/{kind}.md"]
        for name in registry.names():
            section = page.split(f"## `{name}`\n", 1)
            assert len(section) == 2, f"{name} ({kind}) has no section on components/{kind}.md"
            body = section[1].split("\n## ", 1)[0]
            for option, _, _ in dp.options(registry.get(name)):
                assert f"**`{option}`**" in body, f"{kind} {name}: option {option} not listed"


def test_component_pages_follow_the_registry() -> None:
    """A component registered now appears, with its paper, fields, types and defaults."""
    from robcomp.attacks import ATTACKS

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Probe:
        """A probe attack (Doe et al. 2031, "On probes").

        Attributes:
            eps: the radius.
            steps: how many steps.
        """

        eps: float
        steps: int = 7

    with ATTACKS.temporarily("docs-probe", Probe):
        page = dp.pages()["components/attacks.md"]
    row = '| [`docs-probe`](#docs-probe) | A probe attack (Doe et al. 2031, "On probes"). |'
    assert row in page
    assert "- **`eps`** (`float`, required): the radius." in page
    assert "- **`steps`** (`int`, default `7`): how many steps." in page
    assert "docs-probe" not in dp.pages()["components/attacks.md"]


def test_model_options_come_from_the_factory_signature() -> None:
    from robcomp.models import MODELS

    def probe_net(*, num_classes: int, in_shape: tuple[int, ...], width: int = 3) -> None:
        """A probe network (Roe 2030).

        Args:
            width: channels of the first layer.
        """

    with MODELS.temporarily("probe_net", probe_net):
        page = dp.pages()["components/models.md"]
    body = page.split("## `probe_net`\n", 1)[1].split("\n## ", 1)[0]
    assert "- **`width`** (`int`, default `3`): channels of the first layer." in body
    assert "num_classes" not in body and "in_shape" not in body


def test_home_page_is_the_readme_with_site_links() -> None:
    home = dp.pages()["index.md"]
    readme = (ROOT / "README.md").read_text()
    assert "](docs/" in readme and "](docs/" not in home
    assert home == readme.replace("](docs/", "](")


def _nav_paths(entries: list[object]) -> list[str]:
    paths: list[str] = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        paths += _nav_paths(value) if isinstance(value, list) else [str(value)]
    return paths


def test_every_page_the_nav_or_the_readme_names_exists() -> None:
    generated = set(dp.pages())
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    for path in _nav_paths(nav):
        assert path in generated or (ROOT / "docs" / path).is_file(), f"nav names missing {path}"
    links = re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text())
    assert links
    for link in links:
        page = link.removeprefix("docs/")
        assert page in generated or (ROOT / link).exists(), f"README links to missing {link}"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_docs_page_is_in_the_nav(page: str) -> None:
    nav = _nav_paths(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert page in nav, f"docs/{page} is not in mkdocs.yml's nav"


def test_the_results_page_names_every_kept_run_and_benchmark() -> None:
    page = dp.pages()["results.md"]
    runs = sorted((ROOT / "docs/results").glob("*/run.json"))
    assert runs
    for run in runs:
        assert f"| `{run.parent.name}` |" in page
    for result in (ROOT / "bench/results").glob("*.json"):
        assert f"`bench/results/{result.name}`" in page


def test_sphinx_roles_become_markdown_code() -> None:
    text = "a :class:`~robcomp.data.DataSplits`, :func:`robcomp.api.parse_spec` and ``x``"
    assert dp.markdown(text) == "a `DataSplits`, `robcomp.api.parse_spec` and `x`"


def test_the_shift_page_lists_the_evaluate_layer_shifts_without_run_time_fields() -> None:
    """manifold-sets registers into robcomp.evaluate's shift registry, not data's; its VAE is
    bound by the pipeline at run time and is no option a user can set."""
    page = dp.pages()["components/shifts.md"]
    assert "## `manifold-sets`\n" in page
    assert "**`manifold`**" not in page
