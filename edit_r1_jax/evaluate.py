"""Benchmark a converted editor (optionally with a trained LoRA) on GEdit-Bench or ImgEdit-Bench Basic, judged by
a local Qwen2.5-VL.

    python -m edit_r1_jax.evaluate --bench gedit --data GEDIT_DIR --model KONTEXT_DIR [--lora LORA] \
        --judge QWEN_DIR --out OUT [--language en|cn] [--prompts SC_PQ.json] [--judge-mode generate|logits]
    python -m edit_r1_jax.evaluate --config eval.json            (the same options as JSON; flags override)
    python -m edit_r1_jax.evaluate --compare OUT_A OUT_B          (two runs side by side, B - A per group)

Phases (each with a progress bar): 1. edit every row (batched, the noise seed fixed per row from its key) and
save OUT/images/KEY.png; 2. judge every edited row, appending one JSON line per row to OUT/results.jsonl as
soon as it is judged; 3. write OUT/summary.json, OUT/table.md and OUT/chart.png. A rerun with the same --out
skips rows already edited and rows already judged (ok or unparsed); rows that failed (missing image, ...) are
tried again. OUT/run.json pins the settings: resuming with different ones is refused.

The editor (FLUX.1-Kontext or Qwen-Image-Edit, detected from --model) sees the source centre-cropped to a square
and resized to --resolution (the editors here edit squares); the judge sees that same square source and the
edited image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from edit_r1_jax import host_memory
from edit_r1_jax.evaluation import aggregate as agg
from edit_r1_jax.evaluation import benchmarks as bm
from edit_r1_jax.evaluation import parsing, prompts as pr, report

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
# options pinned in run.json: a resumed run must use the same ones
PINNED = ("bench", "data", "images", "language", "subset", "model", "lora", "judge", "prompts", "steps", "guidance",
          "resolution", "seed", "max_new_tokens", "judge_mode", "retry_temperature", "judge_dtype")
DEFAULTS = dict(bench=None, data=None, images=None, model=None, lora=None, judge=None, out=None, language="en",
                subset="fullset", prompts=None, judge_mode="generate", steps=28, guidance=2.5, resolution=512,
                seed=0, batch_size=4, judge_batch_size=4, max_new_tokens=512, retry_temperature=0.7, t5_length=128,
                judge_dtype="bfloat16", judge_mesh="data=-1", edit_mesh="data=-1", limit=None, no_progress=False,
                compile_cache_dir="", host_malloc="auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m edit_r1_jax.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="JSON file with any of the options below (command-line flags override it)")
    ap.add_argument("--compare", nargs=2, metavar=("OUT_A", "OUT_B"), help="print two runs side by side and exit")
    ap.add_argument("--bench", choices=["gedit", "imgedit"])
    ap.add_argument("--data", help="benchmark folder (GEdit: parquet shards or jsonl export; ImgEdit: basic_edit.json)")
    ap.add_argument("--images", help="ImgEdit image root (default: DATA/singleturn or DATA)")
    ap.add_argument("--language", choices=list(bm.GEDIT_LANGUAGES), help="GEdit instruction language (default en)")
    ap.add_argument("--subset", choices=["fullset", "intersection"],
                    help="GEdit rows to edit (default fullset; the intersection table is always reported too)")
    ap.add_argument("--model", help="converted editor directory (python -m tools.convert_weights kontext)")
    ap.add_argument("--lora", help="trained LoRA (.safetensors or folder), optional")
    ap.add_argument("--judge", help="converted Qwen2.5-VL directory (python -m tools.convert_weights qwen2.5-vl)")
    ap.add_argument("--out", help="output folder (rerun with the same folder to resume)")
    ap.add_argument("--prompts", help="judge prompt file(s): GEdit {\"SC\",\"PQ\"} JSON or folder with SC.txt/PQ.txt; "
                                      "ImgEdit its prompts.json. Default: built-in, NOT the official prompts")
    ap.add_argument("--judge-mode", choices=["generate", "logits"],
                    help="generate: the benchmark protocol (default); logits: also the digit-logit expected score, "
                         "reported beside the generated one")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--seed", type=int, help="base seed; each row's noise seed is derived from it and the row key")
    ap.add_argument("--batch-size", type=int, help="edits per batch")
    ap.add_argument("--judge-batch-size", type=int, help="judge prompts per batch")
    ap.add_argument("--max-new-tokens", type=int, help="judge answer length limit (GEdit's Qwen judge: 512)")
    ap.add_argument("--retry-temperature", type=float,
                    help="an unparseable answer is asked once more, sampled at this temperature (default 0.7)")
    ap.add_argument("--t5-length", type=int)
    ap.add_argument("--judge-dtype", choices=["bfloat16", "float32"], help="judge compute/parameter dtype (bfloat16)")
    ap.add_argument("--judge-mesh", help="judge mesh, e.g. 'data=-1' (default: batch over every device) or "
                                         "'fsdp=8' / 'tensor=8' for a judge that does not fit one device")
    ap.add_argument("--edit-mesh", help="editor mesh, e.g. 'data=-1' (default: edits batched over every device, a "
                                        "batch padded to a multiple of the data size) or 'fsdp=8' for a DiT that "
                                        "does not fit one device")
    ap.add_argument("--limit", type=int, help="only the first N rows (smoke runs)")
    ap.add_argument("--no-progress", action="store_true", default=None)
    ap.add_argument("--compile-cache-dir", help="compiled programs kept for the next start (a rerun resuming the "
                                                "same --out): a folder or bucket URL, 'none' = off; default "
                                                "JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/edit_r1_jax/xla")
    ap.add_argument("--host-malloc", choices=host_memory.SETTINGS,
                    help="XLA:CPU's per-call buffers: keep = reused (glibc keeps freed memory, calls run on the "
                         "calling thread), system = glibc and jax as they are, auto (default) = keep where jax runs "
                         "on the CPU only")
    return ap


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def resolve_options(args: argparse.Namespace) -> dict:
    opts = dict(DEFAULTS)
    if args.config:
        p = Path(args.config)
        if not p.exists():
            raise FileNotFoundError(f"--config {p} not found")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: not valid JSON: {e}") from e
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"--config {p}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
        opts.update(cfg)
    for k in DEFAULTS:
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    missing = [k for k in ("bench", "data", "model", "judge", "out") if not opts.get(k)]
    if missing:
        raise ValueError(f"missing option(s) {['--' + m.replace('_', '-') for m in missing]}")
    if opts["bench"] not in ("gedit", "imgedit"):
        raise ValueError(f"bench must be gedit or imgedit, got {opts['bench']!r}")
    host_memory.check(opts["host_malloc"], "host_malloc")
    if opts["judge_mode"] not in ("generate", "logits"):
        raise ValueError(f"judge_mode must be generate or logits, got {opts['judge_mode']!r}")
    for k in ("steps", "batch_size", "judge_batch_size", "max_new_tokens", "resolution"):
        if int(opts[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {opts[k]}")
    return opts


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {"data": 2, "tensor": 4}."""
    out = {}
    for part in str(text).split(","):
        name, eq, size = part.partition("=")
        if not eq or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"expected axis=size pairs separated by commas, got {part!r}")
        out[name.strip()] = int(size)
    return out


def _mesh(text: str, flag: str):
    """The mesh of ``flag`` on every device (None on one device: plain single-device code). Sharded as the trainer
    and the reward: parameters by their logical axes, the batch over data x fsdp."""
    import jax

    try:
        shape = parse_mesh(text)  # checked on one device too
        if jax.device_count() == 1:
            return None
        from edit_r1_jax.parallel.mesh import make_mesh

        return make_mesh(shape)
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: {e}") from e


def row_seed(base: int, key: str) -> int:
    """Noise seed of a row: independent of batching, order and resumption."""
    return (int(base) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 31)


# ------------------------------------------------------------------------------------------------- outputs
class RunDir:
    def __init__(self, out: Path, opts: dict):
        self.out = Path(out)
        self.images = self.out / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        pinned = {k: opts[k] for k in PINNED}
        run = self.out / "run.json"
        if run.exists():
            before = json.loads(run.read_text())
            diff = {k: (before.get(k), pinned[k]) for k in PINNED if before.get(k) != pinned[k]}
            if diff:
                raise ValueError(f"{run}: this folder holds a run with other settings {diff} (old, new); "
                                 f"use another --out")
        else:
            run.write_text(json.dumps(pinned, indent=1))

    def edited_path(self, key: str) -> Path:
        return self.images / f"{_safe(key)}.png"

    def load_results(self) -> dict[str, dict]:
        done = {}
        if self.results.exists():
            for n, line in enumerate(self.results.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write: that row is judged again
                    log.warning("%s:%d is not valid JSON (interrupted write?); that row is judged again",
                                self.results, n)
                    continue
                done[r["key"]] = r
        return done

    def append(self, records: Sequence[dict]) -> None:
        with self.results.open("a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _bar(total, desc, disabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=disabled)


# ------------------------------------------------------------------------------------------------- phase 1
def source_square(row: bm.Row, resolution: int) -> np.ndarray:
    from edit_r1_jax.data.images import MIN_SIDE, ImageLoadError, center_crop_resize

    img = row.open_image()
    if min(img.size) < MIN_SIDE:
        raise ImageLoadError(f"{row.where}: image {img.size} is smaller than {MIN_SIDE}x{MIN_SIDE}")
    return np.asarray(center_crop_resize(img, resolution), dtype=np.uint8).copy()


def edit_rows(rows: Sequence[bm.Row], run: RunDir, opts: dict, errors: dict, mesh=None) -> None:
    """Edit the rows whose image is not on disk yet; image failures go to ``errors`` (key -> record). ``mesh``:
    the editor's (``--edit-mesh``; None = one device)."""
    from PIL import Image

    todo = [r for r in rows if not run.edited_path(r.key).exists()]
    log.info("edit phase: %d of %d rows to edit (%d already on disk)", len(todo), len(rows), len(rows) - len(todo))
    if not todo:
        return
    from edit_r1_jax.pipeline import Editor

    editor = Editor.from_pretrained(Path(opts["model"]), lora=opts["lora"], t5_length=opts["t5_length"], mesh=mesh)
    log.info("edit phase: %s model %s", editor.family.name, opts["model"])
    if editor.mesh is not None:
        log.info("edit phase: DiT on mesh %s, each batch padded to a multiple of %d", dict(editor.mesh.shape),
                 editor.batch_multiple)
    h, w = editor.token_grid(opts["resolution"])
    bar = _bar(len(todo), "editing", opts["no_progress"])
    bs = int(opts["batch_size"])
    try:
        for i in range(0, len(todo), bs):
            batch, pixels = [], []
            for r in todo[i: i + bs]:
                try:
                    pixels.append(source_square(r, opts["resolution"]))
                    batch.append(r)
                except (FileNotFoundError, ValueError) as e:  # ImageLoadError is a ValueError
                    errors[r.key] = _error_record(r, "image", str(e))
                    bar.update(1)
            if not batch:
                continue
            noise = np.concatenate([editor.make_noise(1, h, w, row_seed(opts["seed"], r.key)) for r in batch])
            out = editor.edit(np.stack(pixels), [r.instruction for r in batch], num_steps=opts["steps"],
                              guidance=opts["guidance"], noise=noise)
            for r, img in zip(batch, out):
                u8 = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
                tmp = run.edited_path(r.key).with_suffix(".tmp.png")
                Image.fromarray(u8, mode="RGB").save(tmp)
                tmp.replace(run.edited_path(r.key))  # atomic: a killed run never leaves half an image
            bar.update(len(batch))
    finally:
        bar.close()


def _error_record(row: bm.Row, stage: str, error: str) -> dict:
    return {"key": row.key, "group": row.group, "status": "error", "stage": stage, "where": row.where,
            "error": error}


# ------------------------------------------------------------------------------------------------- phase 2
GEDIT_PREFIX = '{\n"score" : ['  # VIEScore's answer format, up to the first score (logits mode)


def _ask_with_retry(judge, requests, parse, opts, seed):
    """answers + parses; requests whose answer does not parse are asked once more (sampled)."""
    answers = judge.answer(requests)
    parsed = [parse(i, a) for i, a in enumerate(answers)]
    history = [[a] for a in answers]
    retry = [i for i, (v, _) in enumerate(parsed) if v is None]
    if retry:
        again = judge.answer([requests[i] for i in retry], temperature=float(opts["retry_temperature"]), seed=seed)
        for i, a in zip(retry, again):
            history[i].append(a)
            parsed[i] = parse(i, a)
    return parsed, history


def judge_gedit(judge, rows, run, opts, prm: pr.GEditPrompts, sources) -> list[dict]:
    from PIL import Image

    reqs = []
    for r in rows:
        edited = np.asarray(Image.open(run.edited_path(r.key)).convert("RGB"))
        reqs.append(_req([sources[r.key], edited], prm.sc_text(r.instruction), True))
        reqs.append(_req([edited], prm.pq, True))
    parsed, history = _ask_with_retry(judge, reqs, lambda i, a: parsing.parse_viescore(a), opts,
                                      seed=row_seed(opts["seed"] + 1, rows[0].key))
    logit = None
    if opts["judge_mode"] == "logits":
        for q in reqs:
            q.prefix = GEDIT_PREFIX
        logit = judge.expected_scores(reqs, 0, 10)
    out = []
    for j, r in enumerate(rows):
        (sc, sc_err), (pq, pq_err) = parsed[2 * j], parsed[2 * j + 1]
        rec = {"key": r.key, "group": r.group, "language": r.language, "intersection": r.intersection,
               "instruction": r.instruction, "edited": str(run.edited_path(r.key).relative_to(run.out)),
               "answers": {"SC": history[2 * j], "PQ": history[2 * j + 1]}, "prompts": prm.source}
        if sc is None or pq is None:
            why = [f"{n}: {e}" for n, e in (("SC", sc_err), ("PQ", pq_err)) if e]
            rec.update(status="unparsed", error="; ".join(why))
        else:
            rec.update(status="ok", sc_scores=sc, pq_scores=pq, **agg.gedit_row_scores(sc, pq))
        if logit is not None:
            s, p = logit[2 * j], logit[2 * j + 1]
            rec["logits"] = {"SC": s, "PQ": p, "O": float(np.sqrt(s * p))}
        out.append(rec)
    return out


def judge_imgedit(judge, rows, run, opts, prm: pr.ImgEditPrompts, sources) -> list[dict]:
    from PIL import Image

    reqs, crits = [], []
    for r in rows:
        edited = np.asarray(Image.open(run.edited_path(r.key)).convert("RGB"))
        reqs.append(_req([sources[r.key], edited], prm.text(r.group, r.instruction), False))
        crits.append(prm.criteria(r.group))
    parsed, history = _ask_with_retry(judge, reqs, lambda i, a: parsing.parse_imgedit(a, crits[i]), opts,
                                      seed=row_seed(opts["seed"] + 1, rows[0].key))
    logit = None
    if opts["judge_mode"] == "logits":
        per = []
        for q, cs in zip(reqs, crits):
            for c in cs:  # one forced answer line per criterion
                per.append(_req(q.images, q.text, q.images_first, prefix=f"{c}: "))
        vals = judge.expected_scores(per, 1, 5)
        logit = [vals[3 * j: 3 * j + 3] for j in range(len(rows))]
    out = []
    for j, r in enumerate(rows):
        scores, err = parsed[j]
        rec = {"key": r.key, "group": r.group, "instruction": r.instruction,
               "edited": str(run.edited_path(r.key).relative_to(run.out)), "criteria": list(crits[j]),
               "answers": history[j], "prompts": prm.source}
        if scores is None:
            rec.update(status="unparsed", error=err)
        else:
            rec.update(status="ok", scores=scores, score=sum(scores) / len(scores))
        if logit is not None:
            rec["logits"] = {"criteria": logit[j], "score": sum(logit[j]) / 3}
        out.append(rec)
    return out


def _req(images, text, images_first, prefix=""):
    from edit_r1_jax.evaluation.judge import Request

    return Request(images=list(images), text=text, images_first=images_first, prefix=prefix)


def judge_rows(judge, rows, run: RunDir, opts, prm, done: dict, errors: dict) -> None:
    todo = [r for r in rows if r.key not in done and r.key not in errors and run.edited_path(r.key).exists()]
    log.info("judge phase: %d rows to judge (%d already judged)", len(todo), len(done))
    fn = judge_gedit if opts["bench"] == "gedit" else judge_imgedit
    bar = _bar(len(todo), "judging", opts["no_progress"])
    bs = int(opts["judge_batch_size"])
    try:
        for i in range(0, len(todo), bs):
            batch, sources = [], {}
            for r in todo[i: i + bs]:
                try:
                    sources[r.key] = source_square(r, opts["resolution"])
                    batch.append(r)
                except (FileNotFoundError, ValueError) as e:
                    errors[r.key] = _error_record(r, "image", str(e))
                    bar.update(1)
            if not batch:
                continue
            records = fn(judge, batch, run, opts, prm, sources)
            run.append(records)  # at once: a killed run resumes after the last judged batch
            done.update({rec["key"]: rec for rec in records})
            bar.update(len(batch))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------- phase 3
def write_summary(run: RunDir, opts: dict, rows, problems, done: dict, errors: dict, prm, judge_name: str) -> dict:
    keys = [r.key for r in rows]
    records = [done[k] for k in keys if k in done and done[k].get("status") != "error"]
    records += [errors[k] for k in keys if k in errors and k not in done]
    records += [p.record() | {"group": None} for p in problems]
    title = ("GEdit-Bench-" + opts["language"].upper() if opts["bench"] == "gedit" else "ImgEdit-Bench Basic")
    summary = {
        "bench": opts["bench"], "bench_title": title, "language": opts["language"], "subset": opts["subset"],
        "model": opts["model"], "lora": opts["lora"], "judge": judge_name, "judge_mode": opts["judge_mode"],
        "prompts": prm.source, "prompts_official": prm.official,
        "counts": agg.counts(records),
        "scores": agg.aggregate(opts["bench"], [r for r in records if r.get("group") is not None]),
        "problems": [{k: r.get(k) for k in ("key", "status", "where", "stage", "error")}
                     for r in records if r["status"] != "ok"],
    }
    summary["counts"]["read_errors"] = len(problems)
    # rows neither judged nor failed (not edited yet: --limit, or an interrupted run); not in "rows"
    summary["counts"]["pending"] = sum(1 for k in keys if k not in done and k not in errors)
    if opts["judge_mode"] == "logits":
        summary["logits_note"] = ("digit-logit expected scores (first score of each list for GEdit, each "
                                  "criterion from a forced answer line for ImgEdit): a monitoring signal reported "
                                  "beside the generated scores, not the benchmark's protocol")
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (run.out / "table.md").write_text(report.markdown(summary))
    report.bar_chart(summary, run.out / "chart.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        try:
            print(report.compare(*args.compare))
        except (FileNotFoundError, ValueError, KeyError) as e:
            return _fail(f"--compare: {e}")
        return 0
    try:
        opts = resolve_options(args)
        if opts["bench"] == "gedit":
            rows, problems = bm.read_gedit(opts["data"], opts["language"], opts["subset"])
            prm = pr.load_gedit_prompts(opts["prompts"])
        else:
            rows, problems = bm.read_imgedit(opts["data"], opts["images"])
            prm = pr.load_imgedit_prompts(opts["prompts"])
            for t in {r.group for r in rows}:
                prm.criteria(t)
        for p in (opts["model"], opts["judge"]):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"directory not found: {p}")
        _mesh(opts["judge_mesh"], "--judge-mesh")  # a malformed judge mesh fails now, not after the edit phase
        edit_mesh = _mesh(opts["edit_mesh"], "--edit-mesh")
        run = RunDir(Path(opts["out"]), opts)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as e:
        return _fail(str(e))
    if opts["limit"]:
        rows = rows[: int(opts["limit"])]
    if not prm.official:
        log.warning("judge prompts: %s; pass --prompts with the benchmark's prompt files for comparable scores",
                    pr.NOT_OFFICIAL)
    for p in problems:
        log.warning("row not used: %s: %s", p.where, p.error)
    from edit_r1_jax import compile_cache

    host_memory.configure(opts["host_malloc"], "--host-malloc")
    compile_cache.use(opts["compile_cache_dir"], "--compile-cache-dir")
    done = {k: v for k, v in run.load_results().items() if v.get("status") in ("ok", "unparsed")}
    errors: dict[str, dict] = {}
    edit_rows(rows, run, opts, errors, edit_mesh)
    if any(r.key not in done and r.key not in errors for r in rows):
        from edit_r1_jax.evaluation.judge import QwenJudge

        import jax
        import jax.numpy as jnp

        try:
            mesh = _mesh(opts["judge_mesh"], "--judge-mesh")
        except ValueError as e:
            return _fail(str(e))
        judge = QwenJudge(opts["judge"], batch_size=int(opts["judge_batch_size"]),
                          max_new_tokens=int(opts["max_new_tokens"]), mesh=mesh,
                          dtype=getattr(jnp, opts["judge_dtype"]))
        judge_rows(judge, rows, run, opts, prm, done, errors)
    summary = write_summary(run, opts, rows, problems, done, errors, prm, str(opts["judge"]))
    print(report.markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
