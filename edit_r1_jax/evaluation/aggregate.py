"""Averages as each benchmark defines them. Only rows with status "ok" enter an average; unparsed and error
rows are counted, never scored.

GEdit-Bench (its calculate_statistics.py): per row SC = min(SC score list), PQ = min(PQ score list),
O = sqrt(SC * PQ); per task group the mean of each; the overall value is the mean over the groups (not over
rows); the same over the intersection subset (rows with Intersection_exist).

ImgEdit-Bench Basic (its step1/step2 scripts): per image the mean of its three 1-5 scores; per edit type the
mean over its images; "overall" here is the mean over the edit types (the papers' "Overall" column), and
``overall_images`` the mean over all images.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from edit_r1_jax.evaluation.benchmarks import GEDIT_GROUPS, IMGEDIT_TYPES


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def counts(records: Sequence[dict]) -> dict:
    c = {"rows": len(records), "scored": 0, "unparsed": 0, "errors": 0}
    for r in records:
        c[{"ok": "scored", "unparsed": "unparsed", "error": "errors"}[r["status"]]] += 1
    return c


def _grouped(records, groups, metrics, get):
    """{group: {metric: mean, "n": rows}}, overall = mean over the groups that have scored rows."""
    table, missing = {}, []
    for g in groups:
        rows = [r for r in records if r["group"] == g]
        vals = [get(r) for r in rows]
        vals = [v for v in vals if v is not None]
        if not vals:
            missing.append(g)
            table[g] = {m: None for m in metrics} | {"n": 0}
            continue
        table[g] = {m: _mean(v[m] for v in vals) for m in metrics} | {"n": len(vals)}
    present = [g for g in groups if table[g]["n"]]
    overall = {m: _mean(table[g][m] for g in present) for m in metrics} | {"n": sum(table[g]["n"] for g in present)}
    return {"groups": table, "overall": overall, "groups_without_scores": missing}


def gedit_row_scores(sc_list: Sequence[float], pq_list: Sequence[float]) -> dict:
    sc, pq = min(sc_list), min(pq_list)
    return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}


def aggregate_gedit(records: Sequence[dict]) -> dict:
    metrics = ("SC", "PQ", "O")
    ok = [r for r in records if r["status"] == "ok"]

    def gen(r):
        return {m: r[m] for m in metrics}

    out = {"counts": counts(records),
           "fullset": _grouped(ok, GEDIT_GROUPS, metrics, gen),
           "intersection": _grouped([r for r in ok if r.get("intersection")], GEDIT_GROUPS, metrics, gen)}
    with_logits = [r for r in records if r.get("logits")]
    if with_logits:
        def lg(r):
            return r["logits"]
        out["logits"] = {"fullset": _grouped(with_logits, GEDIT_GROUPS, metrics, lg),
                         "intersection": _grouped([r for r in with_logits if r.get("intersection")],
                                                  GEDIT_GROUPS, metrics, lg)}
    return out


def aggregate_imgedit(records: Sequence[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    g = _grouped(ok, IMGEDIT_TYPES, ("score",), lambda r: {"score": r["score"]})
    out = {"counts": counts(records), "types": g["groups"], "overall": g["overall"],
           "overall_images": {"score": _mean(r["score"] for r in ok), "n": len(ok)},
           "types_without_scores": g["groups_without_scores"]}
    with_logits = [r for r in records if r.get("logits")]
    if with_logits:
        lg = _grouped(with_logits, IMGEDIT_TYPES, ("score",), lambda r: r["logits"])
        out["logits"] = {"types": lg["groups"], "overall": lg["overall"]}
    return out


def aggregate(bench: str, records: Iterable[dict]) -> dict:
    records = list(records)
    if bench == "gedit":
        return aggregate_gedit(records)
    if bench == "imgedit":
        return aggregate_imgedit(records)
    raise ValueError(f"unknown benchmark {bench!r}")
