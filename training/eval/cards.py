"""Model-card sections written by the evaluation scripts: a rerun replaces its own section instead of adding one."""

from __future__ import annotations

from pathlib import Path


def write_card_section(card: str | Path, section: str, key: str | None = None) -> None:
    """Put the markdown `section` (starting with a "## " heading) into `card`: it replaces the "## " section whose
    heading line contains `key` (default: the heading up to its first "("), else it is appended."""
    card = Path(card)
    heading = section.lstrip("\n").split("\n", 1)[0]
    key = key or heading.split("(", 1)[0]
    text = card.read_text() if card.exists() else ""
    start = next((index for index in _heading_starts(text) if key in text[index:text.find("\n", index + 1)]), -1)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    card.write_text(text.rstrip("\n") + "\n" + section)


def _heading_starts(text: str) -> list[int]:
    """Offsets of the newlines that open "## " headings."""
    starts, index = [], text.find("\n## ")
    while index >= 0:
        starts.append(index)
        index = text.find("\n## ", index + 1)
    return starts
