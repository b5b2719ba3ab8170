"""Judge prompt templates.

The benchmarks' own wording is read from files the user points to (``--prompts``):

* GEdit-Bench (VIEScore, two queries per row): a JSON file ``{"SC": "...", "PQ": "..."}`` or a folder with
  ``SC.txt`` and ``PQ.txt``. SC is VIEScore's context + two-image editing rule + SC rule (placeholder
  ``<instruction>``) and is asked with [source, edited]; PQ is the context + PQ rule, asked with [edited].
* ImgEdit-Bench Basic: its ``prompts.json`` as published ({edit_type: template}, placeholder
  ``<edit_prompt>``), asked with the text first and then [source, edited], as its ``basic_bench.py`` does.

Without ``--prompts`` the built-in paraphrases below are used. They are NOT the official prompts, so scores
made with them are not comparable with published numbers; every output that uses them says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

NOT_OFFICIAL = "built-in default prompts (not the official prompts)"

_JSON_FORMAT = ('Answer in this format, with no other text:\n{\n"score" : [...],\n"reasoning" : "..."\n}')

DEFAULT_GEDIT = {
    "SC": ("You rate AI image edits. Two images follow: the original image, then its edited version.\n"
           + _JSON_FORMAT + "\n"
           "Give two integer scores from 0 to 10. The first: how well the edited image follows the editing "
           "instruction (0 = not at all, 10 = perfectly). The second: how little was changed beyond the "
           "instruction (0 = a completely different image, 10 = a minimal yet effective edit).\n"
           "score = [instruction following, minimal change]\n"
           "Editing instruction: <instruction>\n"),
    "PQ": ("You rate AI-generated images. One image follows.\n" + _JSON_FORMAT + "\n"
           "Give two integer scores from 0 to 10. The first: how natural the image looks (lighting, shadows, "
           "sense of distance; 10 = natural). The second: how free it is of artifacts such as distortions, "
           "blur, watermarks or broken body parts (10 = no artifacts).\n"
           "score = [naturalness, artifacts]\n"),
}

DEFAULT_IMGEDIT_CRITERIA = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
DEFAULT_IMGEDIT = (
    "You rate image edits. You get the editing instruction and two images: before and after the edit. Score the "
    "edit from 1 to 5 on each of three criteria.\n"
    "Prompt Compliance: 1 = the instruction was not carried out, 5 = carried out exactly and only on the "
    "intended content.\n"
    "Visual Naturalness: 1 = broken or heavily blurred result, 5 = seamless, the edit cannot be spotted.\n"
    "Physical & Detail Integrity: 1 = wrong lighting, perspective or ruined details, 5 = physically "
    "consistent with all untouched details preserved.\n"
    "Answer exactly in this format:\nBrief reasoning: at most 20 words.\nPrompt Compliance: A number from 1 to 5.\n"
    "Visual Naturalness: A number from 1 to 5.\nPhysical & Detail Integrity: A number from 1 to 5.\n"
    "editing instruction is : <edit_prompt>.\n\nBelow are the images before and after editing:\n")

_CRITERION = re.compile(r"^\s*([^\n:]{1,60}?)\s*:\s*A number from 1 to 5\.?\s*$", re.MULTILINE | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class GEditPrompts:
    sc: str
    pq: str
    source: str      # the file(s) or NOT_OFFICIAL
    official: bool

    def sc_text(self, instruction: str) -> str:
        return self.sc.replace("<instruction>", instruction)


@dataclasses.dataclass(frozen=True)
class ImgEditPrompts:
    by_type: dict     # edit_type -> template ("*" = any type)
    source: str
    official: bool

    def template(self, edit_type: str) -> str:
        t = self.by_type.get(edit_type, self.by_type.get("*"))
        if t is None:
            raise KeyError(f"prompts file {self.source} has no template for edit_type {edit_type!r}")
        return t

    def text(self, edit_type: str, instruction: str) -> str:
        return self.template(edit_type).replace("<edit_prompt>", instruction)

    def criteria(self, edit_type: str) -> tuple[str, ...]:
        """The three criterion names the template asks for ("Name: A number from 1 to 5.")."""
        names = tuple(m.strip() for m in _CRITERION.findall(self.template(edit_type)))
        if len(names) != 3:
            raise ValueError(f"template for {edit_type!r} in {self.source} names {len(names)} criteria "
                             f"{list(names)}; expected three 'Name: A number from 1 to 5.' lines")
        return names


def load_gedit_prompts(path: str | Path | None) -> GEditPrompts:
    if path is None:
        return GEditPrompts(DEFAULT_GEDIT["SC"], DEFAULT_GEDIT["PQ"], NOT_OFFICIAL, False)
    p = Path(path)
    if p.is_dir():
        files = {k: p / f"{k}.txt" for k in ("SC", "PQ")}
        for k, f in files.items():
            if not f.exists():
                raise FileNotFoundError(f"--prompts {p}: {f.name} not found (need SC.txt and PQ.txt)")
        d = {k: f.read_text(encoding="utf-8") for k, f in files.items()}
    elif p.exists():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {p}: not valid JSON: {e}") from e
        missing = [k for k in ("SC", "PQ") if not isinstance(d, dict) or k not in d]
        if missing:
            raise ValueError(f"--prompts {p}: missing key(s) {missing} (expected {{\"SC\": ..., \"PQ\": ...}})")
    else:
        raise FileNotFoundError(f"--prompts {p} not found")
    if "<instruction>" not in d["SC"]:
        raise ValueError(f"--prompts {p}: the SC template has no <instruction> placeholder")
    return GEditPrompts(d["SC"], d["PQ"], str(p), True)


def load_imgedit_prompts(path: str | Path | None) -> ImgEditPrompts:
    if path is None:
        return ImgEditPrompts({"*": DEFAULT_IMGEDIT}, NOT_OFFICIAL, False)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--prompts {p} not found (ImgEdit's Benchmark/Basic/prompts.json)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompts {p}: not valid JSON: {e}") from e
    if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
        raise ValueError(f"--prompts {p}: expected {{edit_type: template string}}")
    for k, v in d.items():
        if "<edit_prompt>" not in v:
            raise ValueError(f"--prompts {p}: template {k!r} has no <edit_prompt> placeholder")
    out = ImgEditPrompts(dict(d), str(p), True)
    for k in d:
        out.criteria(k)  # fail at start-up, not after an hour of editing
    return out
