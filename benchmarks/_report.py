"""Shared pieces of the benchmark scripts (not a benchmark itself): sections printed as plain
text as they come and rendered as markdown for ``--out``, and a host-side timer."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call (which also
    compiles or allocates what the first call needs). For CPU work: no device synchronisation."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Report:
    """Collects sections; prints them as plain text as they come and renders markdown."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))
        print(f"\n== {text} ==", flush=True)

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))
        print(text, flush=True)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
        self.blocks.append(("table", (title, list(header), [list(r) for r in rows])))
        if title:
            print(f"\n{title}")
        print(format_text_table(header, rows), flush=True)

    def markdown(self, preamble: str) -> str:
        out = [preamble.rstrip(), ""]
        for kind, payload in self.blocks:
            if kind == "heading":
                out += [f"### {payload}", ""]
            elif kind == "note":
                out += [payload, ""]
            else:
                title, header, rows = payload
                if title:
                    out += [f"**{title}**", ""]
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
                out += ["| " + " | ".join(row) + " |" for row in rows]
                out.append("")
        return "\n".join(out) + "\n"


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])
