"""HTML blocks of the report's pages: an embedded figure, cells side by side, a table."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(caption)} — <code>{html.escape(path.name)}</code> (+ .csv)</figcaption>'
            '</figure>')



def side_by_side(cells: list[str]) -> str:
    return f'<div class="runs" style="grid-template-columns: repeat({len(cells)}, minmax(0, 1fr))">' + \
        "".join(f"<div>{c}</div>" for c in cells) + "</div>"



def html_table(header: list[str], rows: list[list[str]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(("<tr class=hl>" if i == highlight else "<tr>") + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                   for i, r in enumerate(rows))
    return f"<table class=metrics><tr>{head}</tr>{body}</table>"

