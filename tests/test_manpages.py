"""Man pages are generated from the CLI and must be up to date."""

from __future__ import annotations

from auditor.cli.manpage import render_pages

from conftest import ROOT

REGENERATE = "python -m auditor.cli.manpage man/"


def test_every_command_has_an_up_to_date_page() -> None:
    pages = render_pages()
    assert "resdyn.1" in pages and "resdyn-inspect.1" in pages
    for name, text in pages.items():
        committed = ROOT / "man" / name
        assert committed.exists(), f"man/{name} is missing; run {REGENERATE}"
        assert committed.read_text() == text, f"man/{name} is out of date; run {REGENERATE}"
    extra = {p.name for p in (ROOT / "man").glob("*.1")} - set(pages)
    assert not extra, f"stale pages {extra}; run {REGENERATE}"


def test_pages_have_the_required_sections() -> None:
    for name, text in render_pages().items():
        for section in ("NAME", "SYNOPSIS", "OPTIONS" if name != "resdyn-archs.1" else "NAME",
                        "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"):
            assert f".SH {section}" in text, (name, section)
