"""Markdown tables, a bar chart PNG (PIL: matplotlib is not a dependency) and the side-by-side comparison."""

from __future__ import annotations

import json
from pathlib import Path

from edit_r1_jax.evaluation.benchmarks import GEDIT_GROUPS, IMGEDIT_TYPES


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _header(summary) -> list[str]:
    lines = [f"# {summary['bench_title']}", ""]
    lines.append(f"Judge: `{summary['judge']}`; prompts: {summary['prompts']}.")
    if not summary["prompts_official"]:
        lines.append("**Scores use built-in default prompts (not the official prompts): not comparable with "
                     "published numbers.**")
    c = summary["counts"]
    lines.append(f"Rows: {c['rows']}; scored {c['scored']}, unparsed judge answers {c['unparsed']} "
                 f"(left out of the averages), errors {c['errors']}"
                 + (f", not yet judged {c['pending']}." if c.get("pending") else "."))
    return lines + [""]


def gedit_table(block: dict, title: str) -> list[str]:
    lines = [f"## {title}", "", "| group | n | SC | PQ | O |", "|---|---:|---:|---:|---:|"]
    for g in GEDIT_GROUPS:
        r = block["groups"][g]
        lines.append(f"| {g} | {r['n']} | {_f(r['SC'])} | {_f(r['PQ'])} | {_f(r['O'])} |")
    o = block["overall"]
    lines.append(f"| **overall (mean of groups)** | {o['n']} | {_f(o['SC'])} | {_f(o['PQ'])} | {_f(o['O'])} |")
    if block["groups_without_scores"]:
        lines.append("")
        lines.append("Groups without any scored row (not in the overall mean): "
                     f"{', '.join(block['groups_without_scores'])}.")
    return lines + [""]


def imgedit_table(types: dict, overall: dict, title: str, images: dict | None = None) -> list[str]:
    lines = [f"## {title}", "", "| edit type | n | score (1-5) |", "|---|---:|---:|"]
    for t in IMGEDIT_TYPES:
        lines.append(f"| {t} | {types[t]['n']} | {_f(types[t]['score'])} |")
    lines.append(f"| **overall (mean of types)** | {overall['n']} | {_f(overall['score'])} |")
    if images is not None:
        lines.append(f"| overall (mean of images) | {images['n']} | {_f(images['score'])} |")
    return lines + [""]


def markdown(summary: dict) -> str:
    lines = _header(summary)
    agg = summary["scores"]
    if summary["bench"] == "gedit":
        lines += gedit_table(agg["fullset"], f"GEdit-Bench-{summary['language'].upper()} full set")
        lines += gedit_table(agg["intersection"], f"GEdit-Bench-{summary['language'].upper()} intersection")
        if "logits" in agg:
            lines += ["Expected scores from the digit-token logits (--judge-mode logits): a monitoring signal "
                      "beside, not instead of, the generated scores above.", ""]
            lines += gedit_table(agg["logits"]["fullset"], "Digit-logit expected scores, full set")
    else:
        lines += imgedit_table(agg["types"], agg["overall"], "ImgEdit-Bench Basic", agg["overall_images"])
        if "logits" in agg:
            lines += ["Expected scores from the digit-token logits (--judge-mode logits): a monitoring signal "
                      "beside, not instead of, the generated scores above.", ""]
            lines += imgedit_table(agg["logits"]["types"], agg["logits"]["overall"], "Digit-logit expected scores")
    if summary.get("problems"):
        lines += ["## Rows not scored", "", "| key | status | where | reason |", "|---|---|---|---|"]
        for p in summary["problems"]:
            reason = str(p.get("error", "")).replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {p.get('key')} | {p['status']} | {p.get('where') or ''} | {reason} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- bar chart
def bar_chart(summary: dict, path: str | Path) -> None:
    """Grouped bars per task group / edit type (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    agg = summary["scores"]
    if summary["bench"] == "gedit":
        labels = list(GEDIT_GROUPS) + ["overall"]
        block = agg["fullset"]
        series = {m: [block["groups"][g][m] for g in GEDIT_GROUPS] + [block["overall"][m]] for m in ("SC", "PQ", "O")}
        if "logits" in agg:  # beside, in grey: never drawn as the benchmark's score
            lb = agg["logits"]["fullset"]
            series["O (logits)"] = [lb["groups"][g]["O"] for g in GEDIT_GROUPS] + [lb["overall"]["O"]]
        vmax = 10.0
    else:
        labels = list(IMGEDIT_TYPES) + ["overall"]
        series = {"score": [agg["types"][t]["score"] for t in IMGEDIT_TYPES] + [agg["overall"]["score"]]}
        if "logits" in agg:
            lg = agg["logits"]
            series["score (logits)"] = [lg["types"][t]["score"] for t in IMGEDIT_TYPES] + [lg["overall"]["score"]]
        vmax = 5.0
    colors = [(66, 103, 178), (230, 145, 56), (80, 160, 90)]
    colors = [(170, 170, 170) if "logits" in name else colors[j % 3] for j, name in enumerate(series)]
    font = ImageFont.load_default()
    W, H, left, bottom, top = 80 + 64 * len(labels), 380, 40, 120, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    title = summary["bench_title"] + ("" if summary["prompts_official"] else "  [not the official prompts]")
    d.text((left, 8), title, fill="black", font=font)
    d.text((left, 22), f"judge: {Path(summary['judge']).name}; scored {summary['counts']['scored']}/"
                       f"{summary['counts']['rows']}, unparsed {summary['counts']['unparsed']}", fill="gray", font=font)
    plot_h = H - top - bottom
    for k in range(0, int(vmax) + 1, 1 if vmax <= 5 else 2):
        y = top + plot_h - plot_h * k / vmax
        d.line([(left, y), (W - 10, y)], fill=(225, 225, 225))
        d.text((8, y - 6), str(k), fill="black", font=font)
    n = len(series)
    slot = (W - left - 10) / len(labels)
    bw = slot * 0.8 / n
    for i, lab in enumerate(labels):
        x0 = left + i * slot + slot * 0.1
        for j, (name, vals) in enumerate(series.items()):
            v = vals[i]
            if v is None:
                d.text((x0 + j * bw, top + plot_h - 12), "-", fill="black", font=font)
                continue
            y = top + plot_h - plot_h * min(v, vmax) / vmax
            d.rectangle([x0 + j * bw, y, x0 + (j + 1) * bw - 1, top + plot_h], fill=colors[j])
        # rotated label
        tw = int(d.textlength(lab, font=font)) + 4
        lab_img = Image.new("RGB", (tw, 12), "white")
        ImageDraw.Draw(lab_img).text((2, 0), lab, fill="black", font=font)
        lab_img = lab_img.rotate(60, expand=True, fillcolor="white")
        img.paste(lab_img, (int(x0 + slot / 2 - lab_img.width / 2) + lab_img.width // 3, top + plot_h + 4))
    for j, name in enumerate(series):
        d.rectangle([W - 110, 8 + 14 * j, W - 100, 18 + 14 * j], fill=colors[j])
        d.text((W - 95, 7 + 14 * j), name, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------------------------------- compare
def compare(out_a: str | Path, out_b: str | Path) -> str:
    """Two runs' summaries side by side with B - A per group (markdown)."""
    sa, sb = (json.loads((Path(p) / "summary.json").read_text()) for p in (out_a, out_b))
    if sa["bench"] != sb["bench"]:
        raise ValueError(f"{out_a} is {sa['bench']}, {out_b} is {sb['bench']}: not comparable")
    lines = [f"# {sa['bench_title']}: A = {out_a}, B = {out_b}", ""]
    for s, name in ((sa, "A"), (sb, "B")):
        if not s["prompts_official"]:
            lines.append(f"Run {name} used built-in default prompts (not the official prompts).")
    if sa["prompts"] != sb["prompts"] or sa["judge"] != sb["judge"]:
        lines.append("Warning: the runs used different judges or prompts; differences mix model and judge.")
    lines.append("")

    def d(a, b):
        return "-" if a is None or b is None else f"{b - a:+.3f}"

    if sa["bench"] == "gedit":
        for part in ("fullset", "intersection"):
            A, B = sa["scores"][part], sb["scores"][part]
            lines += [f"## {part}", "", "| group | A SC | B SC | diff | A PQ | B PQ | diff | A O | B O | diff |",
                      "|---|" + "---:|" * 9]
            for g in list(GEDIT_GROUPS) + ["overall"]:
                ra = A["overall"] if g == "overall" else A["groups"][g]
                rb = B["overall"] if g == "overall" else B["groups"][g]
                cells = []
                for m in ("SC", "PQ", "O"):
                    cells += [_f(ra[m]), _f(rb[m]), d(ra[m], rb[m])]
                lines.append(f"| {g} | " + " | ".join(cells) + " |")
            lines.append("")
    else:
        A, B = sa["scores"], sb["scores"]
        lines += ["| edit type | A | B | diff |", "|---|---:|---:|---:|"]
        for t in list(IMGEDIT_TYPES) + ["overall"]:
            ra = A["overall"] if t == "overall" else A["types"][t]
            rb = B["overall"] if t == "overall" else B["types"][t]
            lines.append(f"| {t} | {_f(ra['score'])} | {_f(rb['score'])} | {d(ra['score'], rb['score'])} |")
        lines.append("")
    return "\n".join(lines)
