"""Identity by content: the files a configuration names enter its hash by their bytes.

A cell that names a file (pretrained weights, a teacher or ensemble member checkpoint folder, an
npz dataset) depends on what is in it, not on where it lies: a teacher retrained in place must
give its cells new ids, and a checkpoint copied elsewhere may keep them. Hashing is cached per
process by (path, inode, size, modification time), so a grid of a hundred cells reads each file
once.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from robcomp.models.checkpoint import SPEC, WEIGHTS

# Files worth hashing where a configuration holds a free-form string (model options, objective
# options): weights and array files. Other strings (names, labels) are left as they are.
CONTENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".npy")
_CHUNK = 1 << 20

_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_LOCK = threading.Lock()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached by (path, inode, size, mtime)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    # The inode is in the key because a file replaced atomically within the clock's resolution
    # keeps its mtime (and often its size), but never its inode.
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    with _LOCK:
        _DIGESTS[key] = digest
    return digest


def _is_checkpoint(path: Path) -> bool:
    return (path / SPEC).is_file() and (path / WEIGHTS).is_file()


def content_of(value: str, *, any_file: bool = False) -> str | None:
    """``sha256:<hex>`` of the checkpoint folder or file ``value`` names (a weights or array
    file, or any file with ``any_file``), or None if it names neither (a model name, a missing
    path)."""
    if not value or "\n" in value or len(value) > 4096:
        return None
    try:
        path = Path(value).expanduser()
        if path.is_dir() and _is_checkpoint(path):
            sha = hashlib.sha256()
            for name in (SPEC, WEIGHTS):
                sha.update(f"{name}:{file_digest(path / name)};".encode())
            return f"sha256:{sha.hexdigest()}"
        if path.is_file() and (any_file or path.name.endswith(CONTENT_SUFFIXES)):
            return f"sha256:{file_digest(path)}"
    except OSError:  # an unreadable path, or a string no filesystem accepts
        return None
    return None


def by_content(tree: Any) -> Any:
    """``tree`` (a JSON-ready configuration) with every string that names a checkpoint folder or
    a weights/array file replaced by the digest of its contents."""
    if isinstance(tree, str):
        return content_of(tree) or tree
    if isinstance(tree, dict):
        return {k: by_content(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [by_content(v) for v in tree]
    return tree
