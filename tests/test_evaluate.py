"""Evaluation without models: benchmark readers on tiny fixtures in both published layouts, judge-answer
parsing, aggregation against hand-computed averages, and the judge phase driven by a scripted answer source
(unparsed answers retried once, then recorded with the raw text and left out of the averages).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from edit_r1_jax import evaluate as ev
from edit_r1_jax.evaluation import aggregate as agg
from edit_r1_jax.evaluation import benchmarks as bm
from edit_r1_jax.evaluation import parsing
from edit_r1_jax.evaluation import prompts as pr
from edit_r1_jax.evaluation import report

RES = 32


def _png(path, value, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def gedit_fixture(d):
    """jsonl + images export: 4 good EN rows in 2 groups, a CN row, a malformed line, a bad JSON line, a row
    whose image is missing."""
    rows = [
        dict(key="k1", task_type="background_change", instruction="make the sky red", Intersection_exist=True),
        dict(key="k2", task_type="background_change", instruction="turn the sky blue", Intersection_exist=False),
        dict(key="k3", task_type="color_alter", instruction="make the cat green", Intersection_exist=True),
        dict(key="k4", task_type="color_alter", instruction="make the dog red", Intersection_exist=False),
        dict(key="kmiss", task_type="color_alter", instruction="make it blue", Intersection_exist=True),
    ]
    lines = []
    for i, r in enumerate(rows):
        r.update(instruction_language="en", input_image=f"images/{r['key']}.png")
        if r["key"] != "kmiss":
            _png(d / r["input_image"], 20 * (i + 1))
        lines.append(json.dumps(r))
    lines.append(json.dumps(dict(key="c1", task_type="color_alter", instruction="把猫变绿", Intersection_exist=True,
                                 instruction_language="cn", input_image="images/k3.png")))
    lines.append(json.dumps(dict(key="bad", task_type="color_alter", instruction_language="en")))  # line 7
    lines.append("{not json")  # line 8
    (d / "gedit.jsonl").write_text("\n".join(lines) + "\n")
    return d


def imgedit_fixture(d):
    meta = {"1": {"id": "animal/a.jpg", "prompt": "add a hat", "edit_type": "add"},
            "2": {"id": "animal/b.jpg", "prompt": "add a dog", "edit_type": "add"},
            "3": {"id": "style/c.jpg", "prompt": "make it ukiyo-e", "edit_type": "style"},
            "4": {"id": "style/d.jpg", "prompt": "remove the tree", "edit_type": "remove"},
            "5": {"id": "style/e.jpg", "edit_type": "style"},          # malformed: no prompt
            "6": {"id": "x/missing.jpg", "prompt": "add a cat", "edit_type": "add"}}
    for i, k in enumerate("1234"):
        _png(d / "singleturn" / meta[k]["id"], 30 * (i + 1))
    (d / "basic_edit.json").write_text(json.dumps(meta))
    return d


# --------------------------------------------------------------------------------------------- readers
def test_gedit_reader_layouts_subsets_and_problems(tmp_path):
    d = gedit_fixture(tmp_path / "gedit")
    rows, problems = bm.read_gedit(d, "en")
    assert [r.key for r in rows] == ["k1", "k2", "k3", "k4", "kmiss"]
    assert {p.where.rsplit(":", 1)[1]: p.error for p in problems} == {
        "7": "missing field(s) ['instruction', 'input_image']"[:0] or problems[0].error, "8": problems[1].error}
    assert "missing field" in problems[0].error and "instruction" in problems[0].error and problems[0].key == "bad"
    assert "not valid JSON" in problems[1].error and problems[1].where.endswith("gedit.jsonl:8")
    inter, _ = bm.read_gedit(d, "en", "intersection")
    assert [r.key for r in inter] == ["k1", "k3", "kmiss"]
    cn, _ = bm.read_gedit(d, "cn")
    assert [r.key for r in cn] == ["c1"] and cn[0].open_image().size == (40, 48)
    with pytest.raises(FileNotFoundError, match="kmiss"):
        rows[-1].open_image()
    with pytest.raises(ValueError, match="language"):
        bm.read_gedit(d, "fr")


def test_gedit_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")  # optional dependency: the jsonl layout is tested without it
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(buf, format="PNG")
    t = pa.table({"key": ["a"], "task_type": ["ps_human"], "instruction": ["x"], "instruction_language": ["en"],
                  "input_image": [{"bytes": buf.getvalue(), "path": None}], "Intersection_exist": [True]})
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "train-00000-of-00001.parquet")
    rows, problems = bm.read_gedit(tmp_path, "en")
    assert not problems and rows[0].open_image().size == (30, 20)


def test_imgedit_reader(tmp_path):
    d = imgedit_fixture(tmp_path / "imgedit")
    rows, problems = bm.read_imgedit(d)
    assert [(r.key, r.group) for r in rows] == [("1", "add"), ("2", "add"), ("3", "style"), ("4", "remove"),
                                                ("6", "add")]
    assert len(problems) == 1 and problems[0].key == "5" and "prompt" in problems[0].error
    assert "basic_edit.json['5']" in problems[0].where


# --------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,want", [
    ('{\n"score" : [7, 8],\n"reasoning" : "fine"\n}', [7, 8]),
    ('||V^=^V||\n{"score": [3, 10], "reasoning": "x"}\n||V^=^V||', [3, 10]),
    ('Sure. {"score": [5, 6], "reasoning": "the "sky" is red"}', [5, 6]),   # broken JSON: the literal list
    ("[4, 9]", [4, 9]), ("6", [6]), ('{"score": 7, "reasoning": ""}', [7]),
])
def test_parse_viescore(text, want):
    assert parsing.parse_viescore(text) == ([float(x) for x in want], None)


@pytest.mark.parametrize("text", ["", "I cannot rate this.", '{"score": [11, 3]}', '{"reasoning": "no"}',
                                  '{"score": ["high"]}', "score: seven"])
def test_parse_viescore_refuses(text):
    scores, why = parsing.parse_viescore(text)
    assert scores is None and why


def test_parse_imgedit():
    crit = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
    ok = "Brief reasoning: good.\nPrompt Compliance: 4\nVisual Naturalness: 3\n**Physical & Detail Integrity:** 5"
    assert parsing.parse_imgedit(ok, crit) == ([4.0, 3.0, 5.0], None)
    for bad in ("Prompt Compliance: 4\nVisual Naturalness: 3", "Prompt Compliance: 6\nVisual Naturalness: 3\n"
                "Physical & Detail Integrity: 5", "nothing", "Prompt Compliance: 4\nPrompt Compliance: 2\n"
                "Visual Naturalness: 3\nPhysical & Detail Integrity: 5"):
        assert parsing.parse_imgedit(bad, crit)[0] is None


def test_prompt_files(tmp_path):
    d = pr.load_gedit_prompts(None)
    assert not d.official and d.source == pr.NOT_OFFICIAL and "<instruction>" in d.sc
    (tmp_path / "SC.txt").write_text("rate <instruction>")
    (tmp_path / "PQ.txt").write_text("quality")
    g = pr.load_gedit_prompts(tmp_path)
    assert g.official and g.sc_text("make it red") == "rate make it red"
    (tmp_path / "p.json").write_text(json.dumps({"add": "X\nA: A number from 1 to 5.\nB: A number from 1 to 5.\n"
                                                        "C & D: A number from 1 to 5.\n<edit_prompt>"}))
    i = pr.load_imgedit_prompts(tmp_path / "p.json")
    assert i.criteria("add") == ("A", "B", "C & D") and i.text("add", "hat").endswith("hat")
    with pytest.raises(KeyError, match="style"):
        i.template("style")
    (tmp_path / "bad.json").write_text(json.dumps({"add": "no placeholder"}))
    with pytest.raises(ValueError, match="edit_prompt"):
        pr.load_imgedit_prompts(tmp_path / "bad.json")
    assert pr.load_imgedit_prompts(None).criteria("add") == pr.DEFAULT_IMGEDIT_CRITERIA


# --------------------------------------------------------------------------------------------- judge phase
class ScriptedJudge:
    """Answers by the edited image's fill value (the key is encoded there); ``retry`` answers for a second ask.
    Only for parser/aggregation tests: the end-to-end test runs the real tiny Qwen2.5-VL."""

    def __init__(self, first: dict, retry: dict | None = None):
        self.first, self.retry = first, retry or {}
        self.calls = []

    def _key(self, req, kind):
        return (kind, int(np.asarray(req.images[-1])[0, 0, 0]))

    def answer(self, requests, temperature=0.0, seed=0):
        table = self.first if temperature == 0.0 else self.retry
        out = []
        for q in requests:
            kind = "SC" if len(q.images) == 2 and q.images_first else ("PQ" if q.images_first else "IE")
            out.append(table[self._key(q, kind)])
            self.calls.append((self._key(q, kind), temperature))
        return out


def _opts(bench, data, out, **kw):
    o = dict(ev.DEFAULTS, bench=bench, data=str(data), model="m", judge="j", out=str(out), resolution=RES,
             no_progress=True, judge_batch_size=3)
    o.update(kw)
    return o


def test_gedit_judge_phase_and_aggregation(tmp_path):
    d = gedit_fixture(tmp_path / "gedit")
    rows, problems = bm.read_gedit(d, "en")
    opts = _opts("gedit", d, tmp_path / "out")
    run = ev.RunDir(tmp_path / "out", opts)
    fill = {"k1": 11, "k2": 12, "k3": 13, "k4": 14}
    for k, v in fill.items():  # a half-finished run: edits on disk, nothing judged yet
        _png(run.edited_path(k), v, (RES, RES))
    _png(run.edited_path("kmiss"), 15, (RES, RES))  # edited earlier; its source has gone missing since
    first = {("SC", 11): '{"score": [8, 6], "reasoning": "a"}', ("PQ", 11): '{"score": [9, 7], "reasoning": "b"}',
             ("SC", 12): "[4, 5]", ("PQ", 12): '{"score": [9, 9]}',
             ("SC", 13): "I think it is good", ("PQ", 13): '{"score": [5, 8]}',       # SC parses on retry
             ("SC", 14): "no idea", ("PQ", 14): '{"score": [6, 6]}'}                  # never parses
    retry = {("SC", 13): '{"score": [10, 10], "reasoning": "c"}', ("SC", 14): "still no idea"}
    judge = ScriptedJudge(first, retry)
    done, errors = {}, {}
    ev.judge_rows(judge, rows, run, opts, pr.load_gedit_prompts(None), done, errors)
    assert set(done) == {"k1", "k2", "k3", "k4"} and set(errors) == {"kmiss"}
    assert "kmiss" in errors["kmiss"]["error"] and errors["kmiss"]["stage"] == "image"
    assert sorted(c for c in judge.calls if c[1] > 0) == [(("SC", 13), 0.7), (("SC", 14), 0.7)]  # retried once
    assert done["k4"]["status"] == "unparsed" and done["k4"]["answers"]["SC"] == ["no idea", "still no idea"]
    assert "SC" not in done["k4"] and "O" not in done["k4"]
    assert done["k3"]["status"] == "ok" and done["k3"]["SC"] == 10

    s = ev.write_summary(run, opts, rows, problems, done, errors, pr.load_gedit_prompts(None), "tiny-judge")
    full, inter = s["scores"]["fullset"], s["scores"]["intersection"]
    # hand-computed: SC = min(list), PQ = min(list), O = sqrt(SC * PQ); group means; overall = mean of groups
    bg = dict(SC=(6 + 4) / 2, PQ=(7 + 9) / 2, O=(math.sqrt(42) + 6) / 2)
    ca = dict(SC=10, PQ=5, O=math.sqrt(50))   # k4 unparsed: excluded, never 0
    for m in ("SC", "PQ", "O"):
        assert full["groups"]["background_change"][m] == pytest.approx(bg[m])
        assert full["groups"]["color_alter"][m] == pytest.approx(ca[m])
        assert full["overall"][m] == pytest.approx((bg[m] + ca[m]) / 2)
    assert full["groups"]["color_alter"]["n"] == 1 and full["groups"]["ps_human"]["n"] == 0
    assert "ps_human" in full["groups_without_scores"]
    assert inter["groups"]["background_change"]["SC"] == 6 and inter["overall"]["O"] == pytest.approx(
        (math.sqrt(42) + math.sqrt(50)) / 2)
    assert s["counts"] == {"rows": 7, "scored": 3, "unparsed": 1, "errors": 3, "read_errors": 2, "pending": 0}
    named = {p["key"]: p for p in s["problems"]}
    assert named["k4"]["status"] == "unparsed" and named["kmiss"]["stage"] == "image" and "bad" in named
    assert not s["prompts_official"]
    md = (run.out / "table.md").read_text()
    assert "not the official prompts" in md and "| k4 | unparsed |" in md and "kmiss" in md
    assert "| background_change | 2 | 5.000 | 8.000 |" in md
    assert Image.open(run.out / "chart.png").size[0] > 100
    # every judged row says which prompts made it
    lines = [json.loads(x) for x in (run.out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["prompts"] == pr.NOT_OFFICIAL for x in lines)

    # resume: nothing is asked again for judged rows (ok or unparsed); a line cut by a kill mid-write is
    # skipped (that row would be judged again), not a crash
    with (run.out / "results.jsonl").open("a") as f:
        f.write('{"key": "k9", "status": "o')
    judge2 = ScriptedJudge({})
    done2 = {k: v for k, v in ev.RunDir(run.out, opts).load_results().items()}
    ev.judge_rows(judge2, rows, run, opts, pr.load_gedit_prompts(None), done2, {})
    assert judge2.calls == [] and set(done2) == {"k1", "k2", "k3", "k4"}
    with pytest.raises(ValueError, match="other settings"):
        ev.RunDir(run.out, dict(opts, steps=3))


def test_imgedit_judge_phase_and_aggregation(tmp_path):
    d = imgedit_fixture(tmp_path / "imgedit")
    rows, problems = bm.read_imgedit(d)
    opts = _opts("imgedit", d, tmp_path / "out")
    run = ev.RunDir(tmp_path / "out", opts)
    fill = {"1": 21, "2": 22, "3": 23, "4": 24, "6": 26}
    for k, v in fill.items():
        _png(run.edited_path(k), v, (RES, RES))
    a = "Brief reasoning: ok.\nPrompt Compliance: {}\nVisual Naturalness: {}\nPhysical & Detail Integrity: {}"
    first = {("IE", 21): a.format(4, 3, 5), ("IE", 22): a.format(2, 2, 2), ("IE", 23): a.format(5, 5, 4),
             ("IE", 24): "Prompt Compliance: 9"}
    judge = ScriptedJudge(first, {("IE", 24): "cannot say"})
    done, errors = {}, {}
    ev.judge_rows(judge, rows, run, opts, pr.load_imgedit_prompts(None), done, errors)
    s = ev.write_summary(run, opts, rows, problems, done, errors, pr.load_imgedit_prompts(None), "tiny-judge")
    t = s["scores"]["types"]
    assert t["add"]["score"] == pytest.approx((4 + 3 + 5) / 3 / 2 + 2 / 2) and t["add"]["n"] == 2
    assert t["style"]["score"] == pytest.approx(14 / 3) and t["remove"]["n"] == 0
    assert s["scores"]["overall"]["score"] == pytest.approx((t["add"]["score"] + t["style"]["score"]) / 2)
    assert s["scores"]["overall_images"]["score"] == pytest.approx((4 + 2 + 14 / 3) / 3)
    assert done["4"]["status"] == "unparsed" and done["4"]["answers"] == ["Prompt Compliance: 9", "cannot say"]
    assert s["counts"]["unparsed"] == 1 and s["counts"]["errors"] == 2   # row 5 malformed, row 6 image missing
    assert s["counts"]["pending"] == 0
    md = report.markdown(s)
    assert "| add | 2 |" in md and "not the official prompts" in md


def test_aggregate_ignores_non_ok_rows():
    recs = [{"key": "a", "group": "add", "status": "ok", "score": 4.0},
            {"key": "b", "group": "add", "status": "unparsed"},
            {"key": "c", "group": "add", "status": "error"}]
    out = agg.aggregate("imgedit", recs)
    assert out["types"]["add"] == {"score": 4.0, "n": 1} and out["counts"]["unparsed"] == 1


def test_compare_and_config(tmp_path, capsys):
    def summ(path, o):
        g = {g: {"SC": o, "PQ": o, "O": o, "n": 1} for g in bm.GEDIT_GROUPS}
        block = {"groups": g, "overall": {"SC": o, "PQ": o, "O": o, "n": 11}, "groups_without_scores": []}
        path.mkdir()
        (path / "summary.json").write_text(json.dumps({
            "bench": "gedit", "bench_title": "GEdit-Bench-EN", "prompts": "p", "prompts_official": True,
            "judge": "j", "scores": {"fullset": block, "intersection": block}}))
    summ(tmp_path / "a", 5.0)
    summ(tmp_path / "b", 6.5)
    assert ev.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| overall | 5.000 | 6.500 | +1.500 |" in out and "| color_alter |" in out
    (tmp_path / "c.json").write_text(json.dumps({"bench": "gedit", "stepz": 3}))
    assert ev.main(["--config", str(tmp_path / "c.json")]) == 2
    assert "stepz" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"bench": "gedit", "data": str(tmp_path)}))
    assert ev.main(["--config", str(tmp_path / "c.json")]) == 2
    assert "--model" in capsys.readouterr().err
    assert ev.parse_mesh("data=2, tensor=4") == {"data": 2, "tensor": 4} and ev.parse_mesh("data=-1") == {"data": -1}
    with pytest.raises(ValueError, match="axis=size"):
        ev.parse_mesh("tensor")
    with pytest.raises(ValueError, match="--edit-mesh 'data'"):  # named, and refused on one device too
        ev._mesh("data", "--edit-mesh")


def test_reward_prompt_template_option(tmp_path, tmp_path_factory):
    from qwen_fixtures import qwen_tokenizer_dir
    from transformers import AutoTokenizer

    from edit_r1_jax.models.qwen2_5_vl import processor as P

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")))
    default = P.PromptBuilder(tok)
    assert default.template == P.PROMPT_TEMPLATE  # today's text stays the default
    assert P.PROMPT_TEMPLATE.format(prompt="make it red", requirement="") in default.text("make it red")
    f = tmp_path / "reward_prompt.txt"
    f.write_text("Judge the edit: {prompt}. Requirement: {requirement}. Answer 0-5.")
    custom = P.PromptBuilder(tok, template=str(f))
    assert "Judge the edit: make it red. Requirement: keep it." in custom.text("make it red", "keep it")
    assert P.PromptBuilder(tok, template="Inline {prompt}").text("x").count("Inline x") == 1
    with pytest.raises(ValueError, match="no \\{prompt\\}"):
        P.resolve_template("no field here")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        P.resolve_template(str(tmp_path / "missing.txt"))
    f.write_text("{prompt} {score}")
    with pytest.raises(ValueError, match="reward_prompt.txt"):
        P.resolve_template(str(f))
