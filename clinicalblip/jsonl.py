"""JSON Lines reading shared by manifests, exports, predictions and label inputs (imports only errors)."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from clinicalblip.errors import UserError


def iter_json_objects(lines: Iterable[str], path, error: type[Exception] = UserError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises `error` naming path:line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        yield lineno, obj
