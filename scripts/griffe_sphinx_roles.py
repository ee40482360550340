"""A griffe extension for the API pages: Sphinx roles in docstrings become Markdown code.

robcomp's docstrings name other objects the Sphinx way (``:class:`~robcomp.data.DataSplits```);
mkdocstrings renders Markdown, where such a role would show as typed. The rewrite is the one the
component pages use (``docs_pages.markdown_roles``, beside this file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import griffe

_PAGES = Path(__file__).with_name("docs_pages.py")
_spec = importlib.util.spec_from_file_location("docs_pages", _PAGES)
assert _spec and _spec.loader
docs_pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_pages)


class SphinxRoles(griffe.Extension):
    """Rewrites each object's docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = docs_pages.markdown_roles(obj.docstring.value)
