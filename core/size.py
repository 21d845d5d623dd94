"""What the challenge counts: code bytes plus compressed model bytes, against 16,000,000 (decimal)."""

from __future__ import annotations

from pathlib import Path

CHALLENGE_LIMIT = 16_000_000
ROOT = Path(__file__).resolve().parent.parent


def code_files(backend: str) -> list[Path]:
    """The source a submission needs to rebuild and run the model: core/ and the one backend it trains
    with. Tools, tests and configs are not needed at inference and are not counted."""
    files = sorted((ROOT / "core").glob("*.py")) + sorted((ROOT / f"backend_{backend}").glob("*.py"))
    return [f for f in files if f.is_file()]


def code_bytes(backend: str) -> int:
    return sum(f.stat().st_size for f in code_files(backend))
