"""The README's code-bytes table: each shipped config's exported train_gpt.py, plain / lzma / brotli.

    python scripts/code_bytes_table.py   # prints a markdown table (a few seconds per config)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_config  # noqa: E402
from tools.script import submission_code_bytes  # noqa: E402

UPSTREAM = ("upstream train_gpt.py (baseline)", 47_686, 15_806, 11_041)
# The records' own packed scripts (their lzma + base85 wrappers; ../shared/RECORDS.md), for the record configs.
RECORDS = (("record #1394's own train_gpt.py (packed)", None, 15_516, None),
           ("record #1493's own train_gpt.py (packed)", None, 16_594, None))


def main() -> int:
    print("| config | plain B | lzma B | brotli B |")
    print("|---|---:|---:|---:|")
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml")):
        cfg = load_config(path)
        sizes = [submission_code_bytes(cfg, how) for how in ("none", "lzma", "brotli")]
        print(f"| {path.name} | " + " | ".join(f"{n:,}" for n in sizes) + " |", flush=True)
    for name, *sizes in (UPSTREAM, *RECORDS):
        print(f"| {name} | " + " | ".join("-" if n is None else f"{n:,}" for n in sizes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
