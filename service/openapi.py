"""Export the app's OpenAPI document: ``python -m service.openapi`` or ``tda openapi``.

The committed ``openapi/openapi.json`` is checked against the app by a test, so the document
and the code cannot drift apart silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def document() -> dict[str, Any]:
    """The OpenAPI document of the app (built without opening Redis or indexes)."""
    from service.api.app import create_app
    from service.core.config import Settings

    return create_app(Settings(redis_url=None)).openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def export(path: Path = DEFAULT_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(export(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH))
