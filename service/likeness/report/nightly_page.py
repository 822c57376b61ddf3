"""The nightly summary page (``<data_dir>/nightly/<night>/summary.html``), beside the build report page.

Made from the night's ``summary.json`` document alone (so it can be re-made from
that file); like the build report it is one self-contained page: inline styles,
plots as ``data:`` PNGs, no script, no network request.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from likeness.report import plots

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:auto;padding:1em 2em}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
          ".ok{color:#007a55}.bad{color:#c0392b}img{max-width:100%}")


def _fmt(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:.3f}"


def nightly_page(doc: dict[str, Any]) -> str:
    """HTML of a night: verdict, regressions, failures, then each character's scores and trend plot."""
    e = html.escape
    night, margin = str(doc["night"]), doc["margin"]
    regressions, failures = doc.get("regressions", []), doc.get("failures", [])
    parts = [f"<h1>Nightly builds — {e(night)}</h1>",
             f"<p class={'ok' if doc['ok'] else 'bad'}>" + (
                 "All builds succeeded and no score fell by more than the margin." if doc["ok"] else
                 f"{len(failures)} failed build(s), {len(regressions)} regression(s).") +
             f" Margin: a score falling by more than {margin} since the character's previous successful "
             "build is a regression. All scores are higher-is-better.</p>"]
    if regressions:
        parts.append("<h2>Regressions</h2><table><tr><th>character</th><th>score</th><th>previous</th><th>now</th>"
                     "<th>why</th></tr>" + "".join(
                         f"<tr><td>{e(r['character'])}</td><td>{e(r['score'])}</td><td>{_fmt(r['previous'])}</td>"
                         f"<td>{_fmt(r['current'])}</td><td>{e(r['why'])}</td></tr>" for r in regressions) + "</table>")
    if failures:
        parts.append("<h2>Failed builds</h2><table><tr><th>character</th><th>build</th><th>error</th></tr>" + "".join(
            f"<tr><td>{e(f['character'])}</td><td>{e(f['build_id'])}</td><td>{e(f['error'])}</td></tr>"
            for f in failures) + "</table>")
    trends = doc.get("trends", {})
    for c in doc.get("characters", []):
        prev = c.get("previous")
        parts.append(f"<h2>{e(c['character'])}</h2><p>state <b>{e(c['state'])}</b>"
                     + (" (finished earlier tonight, not rebuilt)" if c.get("reused") else "")
                     + (f", build {e(c['build_id'])}" if c.get("build_id") else "")
                     + (f", compared with {e(prev['night'])} ({e(prev['build_id'])})" if prev else
                        ", no previous successful build to compare with") + "</p>")
        if c.get("error"):
            parts.append(f"<p class=bad>{e(c['error'])}</p>")
        if c.get("scores"):
            before = (prev or {}).get("scores", {})
            parts.append("<table><tr><th>score</th><th>now</th><th>previous</th><th>change</th></tr>")
            for k, v in c["scores"].items():
                p = before.get(k)
                ch = f"{v - p:+.3f}" if isinstance(v, (int, float)) and isinstance(p, (int, float)) else "—"
                parts.append(f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td><td>{_fmt(p)}</td><td>{ch}</td></tr>")
            parts.append("</table>")
        t = trends.get(c["character"]) or {}
        if t.get("series"):
            png = plots.trend_plot(t["nights"], t["series"], f"{c['character']}: scores per night")
            parts.append(f'<img alt="trend of {e(c["character"])}" src="data:image/png;base64,'
                         f'{base64.b64encode(png).decode()}">')
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\"><title>Likeness nightly " + e(night) + "</title><style>" + _STYLE
            + "</style></head><body>" + "".join(parts) + "</body></html>\n")
