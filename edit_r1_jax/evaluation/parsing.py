"""Judge answers -> scores. A score is only ever read from the answer; when it cannot be read the result is
``None`` with the reason, and the caller records the row as unparsed (never 0, never a guess: VIEScore's own
parser guesses a random score after a failed retry, which we do not do).
"""

from __future__ import annotations

import json
import re
from typing import Sequence

DELIMITER = "||V^=^V||"
_SCORE_LIST = re.compile(r'"?score"?\s*:\s*\[([^\[\]]*)\]', re.IGNORECASE)
_BARE_LIST = re.compile(r"^\s*\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]\s*$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def _numbers(items, lo, hi) -> tuple[list[float] | None, str | None]:
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return None, f"score {x!r} is not a number"
        if not lo <= x <= hi:
            return None, f"score {x} outside [{lo}, {hi}]"
        out.append(float(x))
    if not out:
        return None, "empty score list"
    return out, None


def parse_viescore(text: str, lo: float = 0, hi: float = 10) -> tuple[list[float] | None, str | None]:
    """VIEScore answer -> (score list, None) or (None, reason).

    Accepted, in order (as VIEScore's parser, minus its guess): the JSON between two ``||V^=^V||`` delimiters,
    else the outermost ``{...}``; its ``"score"`` is a list (or one number). When that JSON does not load
    (e.g. unescaped quotes in the reasoning) the literal ``"score": [...]`` list is read. Else a bare
    ``[a, b]`` or a bare integer answer.
    """
    if not isinstance(text, str) or not text.strip():
        return None, "empty answer"
    s = text.strip()
    if s.count(DELIMITER) == 2:
        body = s[s.find(DELIMITER) + len(DELIMITER): s.rfind(DELIMITER)]
    else:
        i, j = s.find("{"), s.rfind("}")
        body = s[i: j + 1] if i != -1 and j > i else None
    if body is not None:
        try:
            d = json.loads(body.replace("\n", " "))
        except json.JSONDecodeError:
            d = None
        if isinstance(d, dict) and "score" in d:
            sc = d["score"]
            return _numbers(sc if isinstance(sc, list) else [sc], lo, hi)
        m = _SCORE_LIST.search(body)
        if m:
            parts = [p.strip() for p in m.group(1).split(",") if p.strip()]
            if not all(_NUMBER.match(p) for p in parts):
                return None, f"score list {m.group(0)!r} holds non-numbers"
            return _numbers([float(p) if "." in p else int(p) for p in parts], lo, hi)
        return None, "JSON without a score list"
    m = _BARE_LIST.match(s)
    if m:
        return _numbers([int(p) for p in m.group(1).split(",")], lo, hi)
    if re.fullmatch(r"\d+", s):
        return _numbers([int(s)], lo, hi)
    return None, "no JSON score list, no bare list, no bare number"


_LINE = re.compile(r"^[\s*#>-]*([^\n:]+?)[\s*]*:[\s*]*([0-9]+(?:\.[0-9]+)?)[\s*.]*$", re.MULTILINE)


def parse_imgedit(text: str, criteria: Sequence[str] = ()) -> tuple[list[float] | None, str | None]:
    """ImgEdit answer ("Name: N" lines) -> the three 1-5 scores in the template's criterion order.

    With ``criteria`` every one must appear exactly once (names compared case-insensitively); without, the
    answer must hold exactly three "Name: N" lines. Scores must be integers 1..5.
    """
    if not isinstance(text, str) or not text.strip():
        return None, "empty answer"
    found = [(name.strip(), val) for name, val in _LINE.findall(text)]
    if criteria:
        want = [c.lower() for c in criteria]
        got: dict[str, list[str]] = {}
        for name, val in found:
            if name.lower() in want:
                got.setdefault(name.lower(), []).append(val)
        missing = [c for c in criteria if c.lower() not in got]
        if missing:
            return None, f"criteria {missing} not found as 'Name: N' lines"
        twice = [c for c in criteria if len(got[c.lower()]) > 1]
        if twice:
            return None, f"criteria {twice} given more than once"
        vals = [got[c][0] for c in want]
    else:
        if len(found) != 3:
            return None, f"{len(found)} 'Name: N' lines, expected 3"
        vals = [v for _, v in found]
    out = []
    for v in vals:
        if "." in v or not 1 <= int(v) <= 5:
            return None, f"score {v} is not an integer from 1 to 5"
        out.append(float(v))
    return out, None
