"""Tables and figures as a Markdown page (for reviews and MLflow) and a self-contained HTML page
(for a browser: no scripts, no CDN, images beside it)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from pipeline.report.tables import Table

TITLE = "sparseclip · comparison"
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:12px;margin:0}img{max-width:100%;border:1px solid #eee}"""


def to_markdown(tables: list[Table], figures: Mapping[str, Path], sources: str) -> str:
    lines = [f"# {TITLE}", "", sources, ""]
    for table in tables:
        lines += [f"## {table.title}", "", f"_{table.note}_", "", _md_row(table.header),
                  _md_row(["---", *["---:"] * (len(table.header) - 1)]), *(_md_row(r) for r in table.rows), ""]
    if figures:
        lines += ["## Training curves", ""]
        lines += [f"![{name}]({path.name})" for name, path in figures.items()] + [""]
    return "\n".join(lines)


def to_html(tables: list[Table], figures: Mapping[str, Path], sources: str) -> str:
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>{CSS}</style>"
              f"</head><body><h1>{TITLE}</h1><p>{html.escape(sources)}</p>")]
    for table in tables:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
        parts.append(f"<h2 id='{table.name}'>{html.escape(table.title)}</h2><p class='note'>"
                     f"{html.escape(table.note)}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if figures:
        parts.append("<h2 id='curves'>Training curves</h2>")
        parts += [f"<p><img src='{html.escape(p.name)}' alt='{html.escape(n)}'></p>" for n, p in figures.items()]
    return "".join(parts) + "</body></html>\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
