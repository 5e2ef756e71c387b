"""Pairs in the workspace: list, show, remove, and JSONL export/import in the common preference format.

A line of the JSONL file works in TRL and mlx-lm-lora as it is (`prompt`/`chosen`/`rejected`, and the
same as `messages` lists); the `mipo` object carries what an exact round trip needs (contexts, scores).
Import also reads TRL's conversational forms, so pairs made elsewhere can be trained on here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError
from .fsutil import atomic_write_text
from .prompts_import import iter_jsonl, read_text_file
from .validation import ANSWER_CHARS_MAX, CONTEXT_CHARS_MAX, ID_MAX, PROMPT_CHARS_MAX, check_text
from .workspace import Workspace

_FIELDS = (
    "pair_key", "prompt", "context", "neg_context", "neg_prompt", "strategy", "chosen", "rejected", "seed",
    "settings", "scores", "pmi_margin", "source", "round", "sampler", "origin",
)  # fmt: skip
# Who made a pair: mipo-local's sampler, an imported file, or the user (user_pairs.py).
PAIR_SOURCES = ("generated", "import", "user")


@dataclass
class Pair:
    id: int
    pair_key: str
    prompt: str
    context: str
    neg_context: str | None
    neg_prompt: str | None
    strategy: str
    chosen: str
    rejected: str
    seed: int
    settings: dict
    scores: dict | None
    pmi_margin: float | None
    source: str
    round: int = 1
    sampler: str | None = None  # the run whose model sampled the pair; None: the base model
    origin: str | None = None

    @classmethod
    def from_row(cls, r) -> Pair:
        return cls(
            r["id"], r["pair_key"], r["prompt"], r["context"], r["neg_context"], r["neg_prompt"], r["strategy"],
            r["chosen"], r["rejected"], r["seed"], json.loads(r["settings"]),
            json.loads(r["scores"]) if r["scores"] else None, r["pmi_margin"], r["source"],
            r["round"], r["sampler"], r["origin"],
        )  # fmt: skip


ALL = object()  # list_pairs(sampler=ALL): every pair, whoever sampled it


def list_pairs(ws: Workspace, sampler=ALL) -> list[Pair]:
    """The pairs, by id; `sampler`: only those one model sampled (None: the base model's and imported
    ones, a run name: those of the round that run's model sampled)."""
    if sampler is ALL:
        rows = ws.query("SELECT * FROM pairs ORDER BY id")
    elif sampler is None:
        rows = ws.query("SELECT * FROM pairs WHERE sampler IS NULL ORDER BY id")
    else:
        rows = ws.query("SELECT * FROM pairs WHERE sampler = ? ORDER BY id", (sampler,))
    return [Pair.from_row(r) for r in rows]


def get_pair(ws: Workspace, pair_id: int) -> Pair:
    rows = ws.query("SELECT * FROM pairs WHERE id = ?", (pair_id,))
    if not rows:
        raise UserInputError(f"There is no pair with id {pair_id}.")
    return Pair.from_row(rows[0])


def remove_pair(ws: Workspace, pair_id: int) -> None:
    with ws.transaction() as conn:
        if conn.execute("DELETE FROM pairs WHERE id = ?", (pair_id,)).rowcount == 0:
            raise UserInputError(f"There is no pair with id {pair_id}.")


def to_record(p: Pair) -> dict:
    system = [{"role": "system", "content": p.context}]
    user = [{"role": "user", "content": p.prompt}]
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "system": p.context,
        "messages": {
            "chosen": system + user + [{"role": "assistant", "content": p.chosen}],
            "rejected": system + user + [{"role": "assistant", "content": p.rejected}],
        },
        "mipo": {f: getattr(p, f) for f in _FIELDS if f not in ("prompt", "chosen", "rejected", "context")},
    }


def export_jsonl(ws: Workspace, path: Path) -> int:
    pairs = list_pairs(ws)
    atomic_write_text(Path(path), "".join(json.dumps(to_record(p), ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs)


def _turns(value, where: str) -> dict[str, str]:
    """{role: content} of the last system, user and assistant turns of a message list."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise UserInputError(f"{where} is not a list of {{'role', 'content'}} messages.")
    return {m["role"]: m["content"] for m in value}


def _texts(obj: dict, where: str) -> tuple[str, str, str, str]:
    """(context, prompt, chosen, rejected) from any of the accepted line forms.

    Accepted: strings `prompt`/`chosen`/`rejected` (+ optional `system`), as we write; TRL's conversational
    form (`prompt` a message list, `chosen`/`rejected` the assistant turns); full conversations in
    `chosen`/`rejected` (TRL's implicit prompt); or our `messages` object with `chosen`/`rejected` lists.
    """
    if isinstance(obj.get("messages"), dict) and not isinstance(obj.get("chosen"), str):
        obj = {**obj, **obj["messages"]}
    prompt, chosen, rejected = obj.get("prompt"), obj.get("chosen"), obj.get("rejected")
    context = obj.get("system") or ""
    if isinstance(chosen, list) or isinstance(rejected, list):
        head = _turns(prompt, f"{where} 'prompt'") if isinstance(prompt, list) else {}
        pos, neg = _turns(chosen, f"{where} 'chosen'"), _turns(rejected, f"{where} 'rejected'")
        context = head.get("system", pos.get("system", context))
        prompt = head.get("user", pos.get("user", prompt if isinstance(prompt, str) else None))
        chosen, rejected = pos.get("assistant"), neg.get("assistant")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise UserInputError(f"{where} has no non-empty string field '{name}'.")
    if not isinstance(context, str):
        raise UserInputError(f"{where} has a 'system' field that is not a string.")
    context = check_text(context, f"{where}: 'system'", CONTEXT_CHARS_MAX) if context.strip() else ""
    prompt = check_text(prompt, f"{where}: 'prompt'", PROMPT_CHARS_MAX)
    chosen = check_text(chosen, f"{where}: 'chosen'", ANSWER_CHARS_MAX)
    rejected = check_text(rejected, f"{where}: 'rejected'", ANSWER_CHARS_MAX)
    return context, prompt, chosen, rejected


def _meta(obj: dict, where: str) -> dict:
    meta = {} if obj.get("mipo") is None else obj["mipo"]
    expected = {"seed": int, "settings": dict, "scores": dict, "pmi_margin": (int, float), "round": int}
    expected.update({k: str for k in ("pair_key", "neg_context", "neg_prompt", "strategy", "source", "sampler",
                                      "origin")})  # fmt: skip
    if not isinstance(meta, dict):
        raise UserInputError(f"{where} has a 'mipo' field that is not an object.")
    for key, kind in expected.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UserInputError(f"{where} has a 'mipo.{key}' of the wrong type.")
    if meta.get("round") is not None and not 1 <= meta["round"] <= 1000:
        raise UserInputError(f"{where} has a 'mipo.round' outside 1..1000.")
    if meta.get("seed") is not None and not 0 <= meta["seed"] <= ID_MAX:
        raise UserInputError(f"{where} has a 'mipo.seed' outside 0..{ID_MAX}.")
    if meta.get("pmi_margin") is not None and not math.isfinite(meta["pmi_margin"]):
        raise UserInputError(f"{where} has a 'mipo.pmi_margin' that is not a finite number.")
    if meta.get("source") is not None and meta["source"] not in PAIR_SOURCES:
        raise UserInputError(f"{where} has a 'mipo.source' other than {', '.join(PAIR_SOURCES)}.")
    for key in ("pair_key", "strategy", "source"):
        if meta.get(key) is not None and (not meta[key].strip() or len(meta[key]) > 200):
            raise UserInputError(f"{where} has an empty or over-long 'mipo.{key}'.")
    return meta


def _record_to_row(path: Path, number: int, obj) -> dict:
    where = f"{path}: line {number}"
    if not isinstance(obj, dict):
        raise UserInputError(f"{where} is not a JSON object.")
    context, prompt, chosen, rejected = _texts(obj, where)
    meta = _meta(obj, where)
    digest = hashlib.sha256(json.dumps([context, prompt, chosen, rejected]).encode()).hexdigest()[:24]
    return {
        "pair_key": meta.get("pair_key") or f"import-{digest}",
        "prompt": prompt,
        "context": context,
        "neg_context": meta.get("neg_context"),
        "neg_prompt": meta.get("neg_prompt"),
        "strategy": meta.get("strategy") or "import",
        "chosen": chosen,
        "rejected": rejected,
        "seed": meta.get("seed") or 0,
        "settings": json.dumps(meta.get("settings") or {}),
        "scores": json.dumps(meta["scores"]) if meta.get("scores") else None,
        "pmi_margin": meta.get("pmi_margin"),
        "source": meta.get("source") or "import",
        "round": meta.get("round") or 1,
        # An imported pair was sampled by some other workspace's model: it belongs to no round of this one.
        "sampler": None,
        "origin": meta.get("origin"),
        "created_at": time.time(),
    }


def import_jsonl(ws: Workspace, path: Path) -> tuple[int, int]:
    """Import pairs; all or nothing. Returns (added, already present)."""
    path = Path(path)
    text = read_text_file(path)
    rows = [_record_to_row(path, number, obj) for number, obj in iter_jsonl(path, text)]
    if not rows:
        raise UserInputError(f"{path} contains no pairs.")
    added = 0
    with ws.transaction() as conn:
        for row in rows:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO pairs({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})",
                row,
            )
            added += cur.rowcount
    return added, len(rows) - added
