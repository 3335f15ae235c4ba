"""Fixed-width text tables for the command line's reports (stage timings, profiles, checks)."""

from __future__ import annotations

from collections.abc import Container, Sequence


def text_table(
    rows: Sequence[Sequence[str]], right: Container[int] = (), rule: bool = False
) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing blanks stripped; the
    columns in ``right`` right-aligned; ``rule`` draws dashes under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
