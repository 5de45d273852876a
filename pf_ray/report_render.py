"""How a report's blocks become report.md and a self-contained report.html (``pf_ray.report`` builds the blocks)."""

from __future__ import annotations

import base64
import html
import re

FILES_DIR = "report_files"  # the PNGs report.md links to (report.html embeds them)
CSS = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.2rem .5rem}
th{background:#f0f0f0}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1rem;overflow:auto}.warn{background:#fff3cd;border-left:4px solid #e0a800;
padding:.5rem 1rem}"""

# ("h1" | "h2" | "p" | "warn", text), ("code", text, language), ("table", headers, rows), ("img", name, caption)
Block = tuple


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")  # a cell is inline HTML too


def markdown(blocks: list[Block]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "warn":
            out.append(f"> **{rest[0]}**")
        elif kind == "code":
            fence = "`" * max(3, max(map(len, re.findall("`+", rest[0])), default=0) + 1)  # outlasts any inside
            out.append(f"{fence}{rest[1]}\n{rest[0].rstrip()}\n{fence}")
        elif kind == "img":
            out.append(f"![{rest[1]}]({FILES_DIR}/{rest[0]})")
        else:
            headers, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
            out.append("\n".join(lines + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]))
    return "\n\n".join(out) + "\n"


def html_page(blocks: list[Block], figures: dict[str, bytes]) -> str:
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "warn":
            body.append(f'<p class="warn"><strong>{e(rest[0])}</strong></p>')
        elif kind == "code":
            body.append(f"<pre><code>{e(rest[0])}</code></pre>")
        elif kind == "img":
            data = base64.b64encode(figures[rest[0]]).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(rest[1])}">'
                        f"<figcaption>{e(rest[1])}</figcaption></figure>")
        else:
            headers, rows = rest
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    title = e(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
