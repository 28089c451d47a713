"""Label records: how a rater (a person, an LM judge, a reward model or a function) ranked the
responses of an item, appended to a JSON lines file that `tether rm` and `tether dpo` read as it is.

One record per line, in the K-wise preference format (data/preference.py) with extra columns:

    prompt, responses         the item, responses in the input's order (a conversational prompt
                              stays a list of messages, which tether rm and dpo render in their
                              chat template; each response is its text)
    ranks                     0 = best; equal ranks are a tie (and teach a reward model nothing)
    decision                  "chose" (one of two), "ranked" (K), "tie" or "skip"
    item                      the item's key (feedback/items.py)
    rater, time               who labelled it, and when (UTC, ISO 8601)
    shown                     the order the responses were shown in, left to right (indices into
                              responses): the position the rater saw, kept out of their sight
    strength, note            "slightly" / "much" / "" and free text, when given
    sources                   which policy wrote each response, when known ("a", "b")
    confidence                a judge's certainty in [0, 1] (judges only)

Appending is safe against crashes and against other writers: each record is one `write` of a
whole line to a file opened for appending, under an exclusive `flock`, then fsynced. A line cut
off by a crash (only the last line can be) is dropped, with a warning, by readers and by the
next writer, so at most the record being written is lost.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tether.errors import DataError
from tether.eval.stats import WinRate, win_rate
from tether.feedback.items import Item

log = logging.getLogger("tether")

DECISIONS = ("chose", "ranked", "tie", "skip")
STRENGTHS = ("", "slightly", "much")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(item: Item, ranks: Sequence[int], rater: str, decision: str,
                shown: Sequence[int] = (), strength: str = "", note: str = "",
                confidence: Optional[float] = None) -> dict:
    """A label for `item`; `ranks` are in the item's response order (0 = best)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {STRENGTHS}, not {strength!r}")
    ranks = [int(r) for r in ranks]
    if len(ranks) != item.k or sorted(set(ranks)) != list(range(max(ranks) + 1)):
        raise ValueError(f"ranks {ranks} do not rank {item.k} responses as 0, 1, ... without gaps")
    record = {"prompt": item.prompt, "responses": list(item.responses), "ranks": ranks,
              "decision": decision, "item": item.key, "rater": rater, "time": now(),
              "shown": [int(s) for s in shown] or list(range(item.k)), "strength": strength,
              "note": note}
    if item.sources:
        record["sources"] = list(item.sources)
    if confidence is not None:
        record["confidence"] = float(confidence)
    return record


class LabelFile:
    """The append-only label file (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._drop_torn_tail(fd)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock

    def _drop_torn_tail(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        block = min(size, 1 << 20)
        tail = os.pread(fd, block, size - block)
        cut = tail.rfind(b"\n")
        keep = size - block + cut + 1 if cut >= 0 else 0
        log.warning("%s: its last line was cut off (a crash while writing); dropping it", self.path)
        os.ftruncate(fd, keep)

    def read(self) -> list[dict]:
        """Every record; a cut-off last line is dropped with a warning, a malformed line
        elsewhere raises DataError naming the file and line."""
        records = []
        for lineno, row in read_appended(self.path, "not a JSON label record; the file is not a "
                                         "tether label file, or was edited by hand"):
            if not isinstance(row, dict) or "ranks" not in row or "item" not in row:
                raise DataError(f"{self.path}:{lineno}: not a tether label record (no 'item' or "
                                "'ranks'); give --output a new file or one tether wrote")
            records.append(row)
        return records


def read_appended(path: str | Path, hint: str, error: type = DataError) -> list[tuple[int, Any]]:
    """(line number, JSON value) for each line of a JSON lines file tether appends to (none when
    it does not exist). Only the last line can be cut off by a crash while writing: it is
    dropped with a warning. A malformed line elsewhere raises `error` with the file, the line
    and `hint`."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line.decode("utf-8"))))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if lineno == len(lines):  # the last line, without its newline: cut off
                log.warning("%s:%d: a cut-off last line (a crash while writing) is ignored", path, lineno)
                continue
            raise error(f"{path}:{lineno}: {hint}") from None
    return out


def latest_by_rater(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """(item, rater) -> that rater's last record for that item (a relabel replaces the first)."""
    out: dict[tuple[str, str], dict] = {}
    for r in records:
        out[(r["item"], r.get("rater", ""))] = r
    return out


def _outcomes(ranks: Sequence[int]) -> list[int]:
    """For each pair of responses (i < j): -1 if i is better, 1 if j is, 0 for a tie."""
    return [(ranks[i] > ranks[j]) - (ranks[i] < ranks[j])
            for i, j in itertools.combinations(range(len(ranks)), 2)]


def agreement(records: Iterable[dict]) -> dict:
    """Inter-rater agreement over the items two or more raters labelled (skips left out):
    the share of (pair of raters, pair of responses) comparisons with the same outcome (better,
    tie or worse), and Cohen's kappa pooled over those comparisons."""
    by_item: dict[str, list[dict]] = defaultdict(list)
    for (item, _), r in latest_by_rater(records).items():
        if r.get("decision") != "skip":
            by_item[item].append(r)
    same = total = 0
    counts_a: dict[int, int] = defaultdict(int)
    counts_b: dict[int, int] = defaultdict(int)
    items = 0
    for labels in by_item.values():
        if len(labels) < 2:
            continue
        items += 1
        for x, y in itertools.combinations(labels, 2):
            for a, b in zip(_outcomes(x["ranks"]), _outcomes(y["ranks"])):
                same += a == b
                total += 1
                counts_a[a] += 1
                counts_b[b] += 1
    if not total:
        return {"items_labelled_twice": 0}
    p_o = same / total
    p_e = sum(counts_a[c] * counts_b[c] for c in (-1, 0, 1)) / (total * total)
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else 1.0
    return {"items_labelled_twice": items, "comparisons": total, "agreement": p_o, "cohen_kappa": kappa}


def agreement_with_given(items: Sequence[Item], records: Iterable[dict]) -> dict:
    """How often the labels agree with the ranks the input already held (gold or human labels),
    over the pairs of responses both rank; ties on either side count as disagreement unless both
    tie."""
    given = {it.key: it.given for it in items if it.given is not None}
    same = total = 0
    for (key, _), r in latest_by_rater(records).items():
        if key not in given or r.get("decision") == "skip":
            continue
        for a, b in zip(_outcomes(r["ranks"]), _outcomes(given[key])):
            same += a == b
            total += 1
    return {"comparisons": total, "agreement": same / total} if total else {"comparisons": 0}


def win_rate_of_a(records: Iterable[dict]) -> Optional[WinRate]:
    """Policy a against policy b over the records of side-by-side items (every rater's last
    label counts once; skips left out): the same figures as `tether eval`, ties as half."""
    score_a, score_b = [], []
    for r in latest_by_rater(records).values():
        sources = r.get("sources") or []
        if r.get("decision") == "skip" or sorted(sources) != ["a", "b"]:
            continue
        ranks = dict(zip(sources, r["ranks"]))
        score_a.append(-ranks["a"])
        score_b.append(-ranks["b"])
    return win_rate(score_a, score_b) if score_a else None


def summary(items: Sequence[Item], records: Sequence[dict]) -> dict:
    """Progress per rater, decisions, the side-by-side win rate and agreement."""
    keys = {it.key for it in items}
    latest = latest_by_rater(r for r in records if r["item"] in keys)
    raters: dict[str, int] = defaultdict(int)
    decisions: dict[str, int] = defaultdict(int)
    for (_, rater), r in latest.items():
        raters[rater] += 1
        decisions[r.get("decision", "")] += 1
    out = {"items": len(items), "labelled_by_rater": dict(raters), "decisions": dict(decisions),
           "agreement": agreement(latest.values()),
           "agreement_with_input": agreement_with_given(items, latest.values())}
    wr = win_rate_of_a(latest.values())
    if wr is not None:
        out["win_rate_a"] = wr.as_dict()
    return out
