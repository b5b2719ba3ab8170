"""End to end on tiny real models: a tiny converted FLUX.1-Kontext edits a GEdit-layout fixture and a tiny
random Qwen2.5-VL (real Qwen2.5 vocabulary) judges it. Random weights answer garbage, so this asserts the
outputs are well formed, that unparsed answers are counted as such (retried once, raw text kept, left out of
the averages), that the missing image is named, and that a rerun resumes instead of redoing work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

from edit_r1_jax import evaluate as ev


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    _, kontext = save_and_convert(root)
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    save_tiny_checkpoint(root / "judge_hf", tok, seed=2)
    judge = convert_cli(root / "judge_hf", root / "judge")
    data = root / "gedit"
    (data / "images").mkdir(parents=True)
    rows = [("r1", "background_change", "make the sky red", True), ("r2", "color_alter", "turn the cat blue", False),
            ("r3", "subject-add", "add a hat", True)]
    lines = []
    rng = np.random.default_rng(0)
    for key, group, ins, inter in rows:
        if key != "r3":  # r3's image is missing
            Image.fromarray(rng.integers(0, 256, (72, 90, 3), dtype=np.uint8)).save(data / "images" / f"{key}.png")
        lines.append(json.dumps({"key": key, "task_type": group, "instruction": ins, "instruction_language": "en",
                                 "Intersection_exist": inter, "input_image": f"images/{key}.png"}))
    (data / "gedit.jsonl").write_text("\n".join(lines) + "\n")
    return root, kontext, judge, data


def test_tiny_run_resume_and_outputs(setup, tmp_path, capsys, monkeypatch):
    from edit_r1_jax import compile_cache

    asked = []  # the option reaches the cache set-up (tests/test_compile_cache.py checks the set-up itself)
    monkeypatch.setattr(compile_cache, "use", lambda setting, flag: asked.append((setting, flag)))
    root, kontext, judge, data = setup
    out = tmp_path / "run"
    argv = ["--bench", "gedit", "--data", str(data), "--model", str(kontext), "--judge", str(judge),
            "--out", str(out), "--resolution", str(RESOLUTION), "--steps", "2", "--t5-length", str(T5_LENGTH),
            "--max-new-tokens", "6", "--judge-batch-size", "2", "--judge-dtype", "float32", "--batch-size", "2",
            "--judge-mode", "logits"]
    # half-finished: only the first row
    assert ev.main(argv + ["--limit", "1", "--compile-cache-dir", "none"]) == 0
    assert asked == [("none", "--compile-cache-dir")]
    first = out / "images" / "r1.png"
    assert first.exists() and not (out / "images" / "r2.png").exists()
    mtime = first.stat().st_mtime_ns
    assert len((out / "results.jsonl").read_text().splitlines()) == 1

    assert ev.main(argv) == 0
    assert first.stat().st_mtime_ns == mtime  # not edited again
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in recs) == ["r1", "r2"]  # r1 not judged again, r3 has no image
    for r in recs:
        assert r["status"] in ("ok", "unparsed")
        assert all(isinstance(a, str) for a in r["answers"]["SC"] + r["answers"]["PQ"])
        if r["status"] == "unparsed":
            assert len(r["answers"]["SC"]) == 2 or len(r["answers"]["PQ"]) == 2  # asked once more
            assert "O" not in r and r["error"]
        else:
            assert 0 <= r["O"] <= 10
        assert set(r["logits"]) == {"SC", "PQ", "O"} and all(0 <= v <= 10 for v in r["logits"].values())
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    assert c["rows"] == 3 and c["errors"] == 1 and c["scored"] + c["unparsed"] == 2 and c["pending"] == 0
    assert c["unparsed"] == sum(r["status"] == "unparsed" for r in recs)
    n_scored = sum(v["n"] for v in s["scores"]["fullset"]["groups"].values())
    assert n_scored == c["scored"]  # unparsed rows are not averaged
    assert {p["key"]: p["stage"] for p in s["problems"] if p["status"] == "error"} == {"r3": "image"}
    assert not s["prompts_official"] and "logits_note" in s
    md = (out / "table.md").read_text()
    assert "not the official prompts" in md and "Digit-logit expected scores" in md and "r3" in md
    png = Image.open(out / "chart.png")
    assert png.mode == "RGB" and png.size[0] > 300
    edited = np.asarray(Image.open(first))
    assert edited.shape == (RESOLUTION, RESOLUTION, 3)
    capsys.readouterr()
    assert ev.main(["--compare", str(out), str(out)]) == 0
    assert "+0.000" in capsys.readouterr().out or c["scored"] == 0


def test_digit_logit_expected_score_matches_transformers(setup):
    """The 0-10 expectation with "10" as the two tokens "1" "0", and a 1-5 one, against transformers' logits."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from edit_r1_jax.evaluation.judge import QwenJudge, Request

    root, _, judge_dir, _ = setup
    judge = QwenJudge(judge_dir, batch_size=1)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "judge_hf").eval()
    req = Request(images=[], text="Rate the edit from 0 to 10.", prefix='{\n"score" : [')
    d = judge.digit_ids
    ids, mask, _, _ = judge._encode_batch([req], extra_ids=[d[1]])
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(ids[mask == 1][None].astype(np.int64))).logits[0].double()
    p = torch.softmax(logits[-2, d], -1).numpy()          # first digit 0..9
    q = torch.softmax(logits[-1], -1)[d[0]].item()         # P("0" | ... "1") over the whole vocabulary
    want = float(np.arange(10) @ p) + p[1] * q * 9         # P(10) = P(1) q moves the "1" mass to 10
    got = judge.expected_scores([req], 0, 10)[0]
    # float32 forward on a 2-layer model vs float64 softmax of torch's float32 logits: 1e-5 on a 0-10 score
    assert abs(got - want) < 1e-5 and abs(want - float(np.arange(10) @ p)) > 1e-6
    p5 = torch.softmax(logits[-2, d[1:6]], -1).numpy()     # 1-5 read right after the prefix
    assert abs(judge.expected_scores([req], 1, 5)[0] - float(np.arange(1, 6) @ p5)) < 1e-5
