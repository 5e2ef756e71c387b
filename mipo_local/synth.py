"""`prompts synth`: the base model proposes questions a person with these contexts would plausibly ask.

Small instruct models answer an instruction such as "write a question this person might ask" with chatter,
so the model instead continues a few-shot document of (note, topic, question) examples with the user's own
note and a topic hint. Candidates are cleaned (first line, no numbering or quotes), filtered (a real question
or request of sensible length, not about the assistant itself, not a copy of the context or of an example)
and deduplicated against every prompt already in the workspace.
"""

from __future__ import annotations

import re
from collections.abc import Generator

from . import gguf_io, modelsource
from .chat import chat_format
from .errors import UserInputError
from .progress import EtaClock, Log, Progress, ShareClock
from .settings import SynthSettings, with_overrides
from .validation import PROMPT_CHARS_MAX, check_text, require_seed
from .workspace import Workspace, normalize_text

TOPICS = (
    "daily life", "food", "work", "health", "money", "travel", "a hobby", "learning something new",
    "family", "technology", "a decision to make", "the weekend", "shopping", "a problem at home",
    "friends", "sleep", "sport", "a gift",
)  # fmt: skip
EXAMPLES = (
    ("I'm a nurse in Lyon working night shifts. I love cycling. Keep it short.", "food",
     "What quick, healthy dinner can I cook before a night shift?"),
    ("I am 19, studying computer science in Pune, and I am always broke.", "money",
     "How can I save money on groceries as a student living in a hostel?"),
    ("Retired teacher, 71, in Vermont. I garden and bake pies.", "a hobby",
     "Which vegetables can I still plant in my garden in late August?"),
)  # fmt: skip
HEADER = "Each person below wrote a note about themselves, then asked an AI assistant a question.\n\n"
N_RANGE = (1, 1000)
BATCH = 16
MAX_TOKENS = 40  # one question; the model often goes on with a new example, which is cut off
PHASE = "writing questions"
CONFIG_KEY = "synth.next_attempt"  # seeds continue across runs, so a rerun proposes new questions

_PREFIX = re.compile(r"^\s*(?:[-*+]|\d+[.)]|q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE)
_REQUEST = re.compile(
    r"^(how|what|which|where|when|why|who|can|could|should|would|is|are|do|does|will|any|tips?|help|"
    r"give|suggest|recommend|explain|tell|write|plan|list)\b",
    re.IGNORECASE,
)
_ABOUT_ASSISTANT = re.compile(
    r"\b(are you|who are you|what are you|your (favou?rite|name|opinion|life))\b|\bmy favou?rite\b|"
    r"^(sure|here|great question|as an ai)\b",
    re.IGNORECASE,
)


def few_shot_text(context: str, topic: str) -> str:
    """The document the base model continues: the examples, then the user's note and a topic."""
    shots = "".join(f"Note: {n}\nTopic: {t}\nQuestion: {q}\n\n" for n, t, q in EXAMPLES)
    return f"{HEADER}{shots}Note: {context}\nTopic: {topic}\nQuestion:"


def _few_shot_ids(cf, context: str, topic: str) -> list[int]:
    """The few-shot document as plain text: no chat template, and the user's note is never markup."""
    return cf.tokenizer.with_bos(cf.tokenizer.encode_text(few_shot_text(context, topic)))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def copies_context(question: str, context: str, run: int = 6) -> bool:
    """True when the question repeats `run` consecutive words of the context (or all of itself)."""
    q, c = _words(question), _words(context)
    if not q:
        return True
    grams = {tuple(c[i : i + run]) for i in range(len(c) - run + 1)}
    return f" {' '.join(q)} " in f" {' '.join(c)} " or any(
        tuple(q[i : i + run]) in grams for i in range(len(q) - run + 1)
    )


def clean_candidate(text: str) -> str | None:
    """The question in a model's continuation, or None when it is not a usable question or request."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"“”'").strip()
    if "?" in line:
        line = line[: line.index("?") + 1]
    if not 12 <= len(line) <= 200 or len(_words(line)) < 4:
        return None
    if not (line.endswith("?") or _REQUEST.match(line)) or _ABOUT_ASSISTANT.search(line):
        return None
    if any(line.casefold() == q.casefold() for _, _, q in EXAMPLES):
        return None
    return line[0].upper() + line[1:]


def synthesize_prompts(
    ws: Workspace, n: int | None = None, *, seed: int | None = None, temperature: float | None = None
) -> Generator[Progress | Log, None, int]:
    """Add up to `n` synthetic prompts. Yields progress; returns how many were added.

    Each batch's questions are committed as they come, so a cancelled run keeps them. Arguments left None
    take their defaults from `settings.SynthSettings`.

    Raises:
        UserInputError: `n` out of range, or no contexts to write questions for.
    """
    from .engine import DecodeStep, Engine, GenRequest

    settings = with_overrides(SynthSettings(), n=n, seed=seed, temperature=temperature)
    n, seed, temperature = settings.n, settings.seed, settings.temperature
    lo, hi = N_RANGE
    if not lo <= n <= hi:
        raise UserInputError(f"--n must be between {lo} and {hi}, not {n}.")
    if not 0.0 < temperature <= 2.0:
        raise UserInputError(f"The synthesis temperature must be in (0, 2], not {temperature}.")
    require_seed("--seed", seed)
    contexts = ws.contexts()
    if not contexts:
        raise UserInputError(
            "There are no contexts yet: synthesis needs to know who you are.",
            hint='Run: mipo-local context add "I am ..."',
        )
    model = modelsource.base_model(ws)
    cf = chat_format(str(model.file))
    n_ctx = gguf_io.read_info(model.file).context_length or 2048
    encoded = {c.id: _few_shot_ids(cf, c.text, TOPICS[0]) for c in contexts}
    usable = [c for c in contexts if len(encoded[c.id]) + MAX_TOKENS + 16 <= n_ctx]
    for c in contexts:
        if c not in usable:
            yield Log("synth", f"Skipped context {c.id}: it is too long for the model's window.", "warning")
    if not usable:
        raise UserInputError("Every context is too long for the model's window; shorten one.")
    existing = {normalize_text(p.text).casefold() for p in ws.prompts()}
    added, tries = 0, 0
    attempt = int(ws.get_config(CONFIG_KEY, 0))
    clock = EtaClock(n)
    ctx_per_seq = min(max(len(encoded[c.id]) for c in usable) + MAX_TOKENS + 16, n_ctx)
    with ws.job("synth", f"mipo-local prompts synth --n {n}"):
        yield Progress("synth", 0, n, "loading the model", unit="prompts", phase="loading model", share=0.0)
        engine = Engine(model.file, n_seq=BATCH, ctx_per_seq=ctx_per_seq)
        share_clock = ShareClock()
        try:
            while added < n and tries < n * 8:
                batch = []
                for _ in range(BATCH):
                    c = usable[attempt % len(usable)]
                    topic = TOPICS[(attempt // len(usable)) % len(TOPICS)]
                    ids = _few_shot_ids(cf, c.text, topic)
                    batch.append(
                        GenRequest(
                            ids,
                            MAX_TOKENS,
                            temperature,
                            0.95,
                            seed=seed * 1_000_003 + attempt,
                            id=(attempt, c.text),
                        )
                    )
                    attempt += 1
                tries += len(batch)
                results = []
                # A batch is expected to bring as many questions per draft as the batches before it (half
                # of them before the first), so the share done moves while the batch is written.
                per_draft = added / (tries - len(batch)) if tries > len(batch) else 0.5
                expected = min(n - added, per_draft * len(batch))
                for item in engine.generate_steps(batch):
                    if not isinstance(item, DecodeStep):
                        results.append(item)
                        continue
                    share = (added + expected * item.fraction) / n
                    message = f"{item.tokens} tokens, {item.done}/{item.total} drafts done"
                    yield Progress("synth", added, n, message, share_clock.eta(share), None, "prompts",
                                   phase=PHASE, share=share)  # fmt: skip
                fresh = []
                for result in sorted(results, key=lambda r: r.id):
                    q = clean_candidate(result.text)
                    if q is None or q.casefold() in existing or copies_context(q, result.id[1]):
                        continue
                    try:  # what the workspace would refuse (a control character) is not a question
                        check_text(q, "question", PROMPT_CHARS_MAX)
                    except UserInputError:
                        continue
                    existing.add(q.casefold())
                    fresh.append(q)
                fresh = fresh[: n - added]
                if fresh:
                    new, _ = ws.add_prompts(fresh, source="synthetic")
                    added += len(new)
                ws.set_config(CONFIG_KEY, attempt)
                rate, _ = clock.estimate(added)
                yield Progress("synth", added, n, "batch saved", share_clock.eta(added / n), rate, "prompts",
                               phase=PHASE, share=added / n)  # fmt: skip
        finally:
            engine.close()
    if added < n:
        yield Log(
            "synth",
            f"Only {added} usable questions came out of {tries} tries; add a few prompts by hand.",
            "warning",
        )
    return added
