"""The latency tables' cache: one JSON file, keyed by device and model, replaced atomically.

``$AUTOSPARSE_CACHE/latency.json`` (default ``~/.cache/autosparse/latency.json``) holds
``{"version": 1, "entries": {key: table}}``. A key starts with :func:`device_key` (device model,
dtype, threads, torch version), so tables of several machines can share a file. A file that cannot
be read or parsed is ignored with a warning and rewritten whole; a folder that cannot be written
warns and the table is measured again next time.

Example:
    >>> cache_path().name
    'latency.json'
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from autosparse.errors import warn

CACHE_VERSION = 1


def cache_path() -> Path:
    """``$AUTOSPARSE_CACHE/latency.json``, by default ``~/.cache/autosparse/latency.json``.

    Example:
        >>> cache_path().name
        'latency.json'
    """
    root = os.environ.get("AUTOSPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autosparse")
    return Path(root) / "latency.json"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a latency depends on besides the module: device model, dtype, threads, torch version.

    Example:
        >>> device_key(torch.device("cpu"), torch.float32).startswith("cpu:")
        True
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return f"{device.type}:{name}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_entries(path: Path, quiet: bool = False) -> dict[str, Any]:
    """The cached entries, or ``{}`` (with a warning unless ``quiet``) if the file is unreadable or
    not a latency cache.

    Example:
        >>> load_entries(Path("/nonexistent/latency.json"))
        {}
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a version-{CACHE_VERSION} latency cache")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not quiet:
            warn(f"latency cache {path} ignored ({type(error).__name__}: {error}); it is rewritten after measuring")
        return {}


def save_entries(path: Path, fresh: dict[str, Any]) -> None:
    """Merge ``fresh`` into the cache file atomically: a temporary file, then ``os.replace``.

    A reader never sees a partial file; two writers at once lose one's new entries, not the file.

    Example:
        >>> save_entries(cache_path(), {"cpu:...|<model hash>": {...}})  # doctest: +SKIP
    """
    entries = {**load_entries(path, quiet=True), **fresh}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latency-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"version": CACHE_VERSION, "entries": entries}, out, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as error:  # a read-only home must not stop pruning: measure again next time
        warn(f"latency cache {path} not written ({error}); set AUTOSPARSE_CACHE to a writable folder")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
