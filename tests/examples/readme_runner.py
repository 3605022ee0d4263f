"""Running an example's README: its ``sh`` blocks, verbatim, in the example's folder."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def readme_blocks(example: str) -> list[str]:
    """The README's ```sh blocks, in order (```console blocks are for reading, not running)."""
    text = (EXAMPLES / example / "README.md").read_text()
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)


def run_block(example: str, block: str, *, cwd: Path | None = None, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One block under ``bash -euo pipefail`` in the example's folder; output captured."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd or EXAMPLES / example,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
