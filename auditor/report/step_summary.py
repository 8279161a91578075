"""The Markdown report appended to a CI job summary (GitHub Actions' ``$GITHUB_STEP_SUMMARY``), within its size."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputError

__all__ = ["SUMMARY_VARIABLE", "SUMMARY_LIMIT", "shortened", "append_step_summary"]

SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"
SUMMARY_LIMIT = 1024 * 1024  # GitHub shows a job summary of at most 1 MiB per step


def shortened(text: str, room: int) -> str:
    """``text`` whole when it fits ``room`` bytes (UTF-8), else cut at a line with a note saying so."""
    data = text.encode()
    if len(data) <= room:
        return text
    note = (f"\n\n> **Shortened**: this report is {len(data):,} bytes; a job summary holds at most "
            f"{SUMMARY_LIMIT:,}. The whole report is in the JSON or HTML output (`--format json|html -o FILE`).\n")
    keep = data[: max(0, room - len(note.encode()))].decode(errors="ignore")
    return keep[: keep.rfind("\n") + 1] + note


def append_step_summary(path: Path, markdown: str) -> None:
    """Append ``markdown`` to the job summary ``path``, shortened to what is left of its 1 MiB.

    Raises
    ------
    OutputError
        The file cannot be written.
    """
    try:
        used = path.stat().st_size if path.exists() else 0
        with open(path, "a", encoding="utf-8") as summary:
            summary.write(shortened(markdown if markdown.endswith("\n") else markdown + "\n", SUMMARY_LIMIT - used))
    except OSError as exc:
        raise OutputError(path, exc, hint=f"set ${SUMMARY_VARIABLE} to a writable file") from exc
