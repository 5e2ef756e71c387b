"""Pairs in the workspace: list, show, remove, and JSONL export/import in the common preference format.

A line of the JSONL file works in TRL and mlx-lm-lora as it is (`prompt`/`chosen`/`rejected`, and the
same as `messages` lists); the `mipo` object carries what an exact round trip needs (contexts, scores).
Import also reads TRL's conversational forms, so pairs made elsewhere can be trained on here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError
from .fsutil import atomic_write_text
from .prompts_import import iter_jsonl, read_text_file
from .workspace import Workspace

_FIELDS = (
    "pair_key", "prompt", "context", "neg_context", "neg_prompt", "strategy", "chosen", "rejected", "seed",
    "settings", "scores", "pmi_margin", "source",
)  # fmt: skip


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

    @classmethod
    def from_row(cls, r) -> Pair:
        return cls(
            r["id"], r["pair_key"], r["prompt"], r["context"], r["neg_context"], r["neg_prompt"], r["strategy"],
            r["chosen"], r["rejected"], r["seed"], json.loads(r["settings"]),
            json.loads(r["scores"]) if r["scores"] else None, r["pmi_margin"], r["source"],
        )  # fmt: skip


def list_pairs(ws: Workspace) -> list[Pair]:
    return [Pair.from_row(r) for r in ws.query("SELECT * FROM pairs ORDER BY id")]


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
    return context, prompt, chosen, rejected


def _meta(obj: dict, where: str) -> dict:
    meta = {} if obj.get("mipo") is None else obj["mipo"]
    expected = {"seed": int, "settings": dict, "scores": dict, "pmi_margin": (int, float)}
    expected.update({k: str for k in ("pair_key", "neg_context", "neg_prompt", "strategy", "source")})
    if not isinstance(meta, dict):
        raise UserInputError(f"{where} has a 'mipo' field that is not an object.")
    for key, kind in expected.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UserInputError(f"{where} has a 'mipo.{key}' of the wrong type.")
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
