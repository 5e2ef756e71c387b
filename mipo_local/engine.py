"""llama.cpp engine: batched sampling and log-prob scoring of many sequences at once.

Generation runs several sequences in ONE `llama_decode` call per step (llama.cpp's batch API with one
sequence id per request, a unified KV cache); finished sequences free their slot for the next request
(continuous batching). Requests admitted together with the same prompt (a pair's K candidates) read it
once, into KV cells their sequences share. Sampling happens in numpy from the logits with a per-request
seeded generator.

Determinism: the same request list gives the same tokens, call after call (each call starts from an empty
KV cache). A request's answer does not depend on the other requests' seeds, but llama.cpp's float results
do depend a little on the batch around a sequence: on the default model (F16, temperature 0.1, 96 tokens)
7 of 8 answers were identical alone and inside a batch of 16. Pair generation therefore always decodes the
same batches for the same plan, so a resumed run matches an uninterrupted one token for token.

Long calls come in two forms: `generate_steps` / `token_logprobs_steps` yield a `DecodeStep` after every
`llama_decode`, so a job built on them reports progress and stops (closing the generator) between two
decode steps; `generate` / `token_logprobs` / `score_many` run them through, with an optional `on_step`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .fsutil import usable_cores
from .llama_loader import load_llama
from .progress import drain


class TooLongError(UserInputError, ValueError):
    """A prompt (or prompt + response) that does not fit the engine's per-sequence context."""


@dataclass(frozen=True)
class Penalties:
    """llama.cpp's (and Ollama's) repetition penalties, applied to the logits before sampling.

    Each of the last `last_n` generated tokens has its logit divided by `repeat` (multiplied, when
    negative), then lowered by `frequency` per occurrence and by `presence` once. The prompt is not
    counted: an answer may name what the question names. The defaults change nothing.
    """

    repeat: float = 1.0
    last_n: int = 64
    presence: float = 0.0
    frequency: float = 0.0

    @property
    def active(self) -> bool:
        return self.last_n != 0 and (self.repeat != 1.0 or self.presence != 0.0 or self.frequency != 0.0)

    def apply(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        recent = history[-self.last_n :] if self.last_n > 0 else history
        if not self.active or not len(recent):
            return logits
        ids, counts = np.unique(np.asarray(recent), return_counts=True)
        x = logits[ids]
        x = np.where(x > 0, x / self.repeat, x * self.repeat)
        x = x - counts * self.frequency - self.presence
        out = logits.copy()
        out[ids] = x
        return out


NO_PENALTIES = Penalties()


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int = 192
    temperature: float = 0.1
    top_p: float = 0.9
    seed: int = 0
    id: object = None
    penalties: Penalties = NO_PENALTIES
    top_k: int = 0
    # Context-contrastive sampling: with a guide prompt (the same question under another context) and
    # guidance g > 0, tokens are drawn from p(y|prompt) * [p(y|prompt) / p(y|guide)]^g, restricted to tokens
    # the prompt itself finds plausible. It tilts the answer towards what the prompt's context changes.
    guide_prompt: list[int] | None = None
    guidance: float = 0.0


@dataclass
class GenResult:
    id: object
    tokens: list[int]
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int = 0


@dataclass(frozen=True)
class DecodeStep:
    """One `llama_decode` call of a long engine call has finished.

    `work_done / work_total` is the call's share done: in sampling, a request counts its `max_tokens`
    (a finished one fully, so the share never runs backwards); in scoring, the tokens of the items scored.
    """

    phase: str  # sampling | scoring
    done: int  # requests (sampling) or items (scoring) finished
    total: int
    tokens: int  # tokens generated (sampling) or read (scoring) so far
    work_done: int
    work_total: int

    @property
    def fraction(self) -> float:
        return 1.0 if self.work_total <= 0 else min(1.0, self.work_done / self.work_total)


OnStep = Callable[[DecodeStep], None] | None


@dataclass
class _Slot:
    request: GenRequest
    rng: np.random.Generator
    pos: int = 0
    tokens: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next decode
    batch_index: int = -1  # row of the last fed token in the batch (its logits)
    guide_seq: int | None = None  # the sequence reading the guide prompt, when the request has one
    guide_pending: list[int] = field(default_factory=list)
    guide_pos: int = 0
    guide_index: int = -1
    # Requests admitted with this one that have the same prompts: their prompts are read once, by this
    # slot's first decode, into cells all of them share (the unified KV cache keeps one copy).
    followers: list[int] = field(default_factory=list)
    led: bool = False  # a follower: its first decode is its leader's
    seq: int = -1


# Guided sampling keeps only tokens at least this likely, relative to the best one, under the main prompt:
# without it, tokens that are unlikely under both prompts but far less so under the guide get amplified.
GUIDE_PLAUSIBLE_LOG = np.log(0.01)


def guided_logits(main: np.ndarray, guide: np.ndarray, guidance: float) -> np.ndarray:
    """(1 + g) log p(.|main) - g log p(.|guide), with implausible tokens (under main) masked out."""
    lp_main = main - np.log(np.exp(main - main.max()).sum()) - main.max()
    lp_guide = guide - np.log(np.exp(guide - guide.max()).sum()) - guide.max()
    out = (1.0 + guidance) * lp_main - guidance * lp_guide
    out[lp_main < lp_main.max() + GUIDE_PLAUSIBLE_LOG] = -np.inf
    return out


def sample_token(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator, top_k: int = 0
) -> int:
    """Temperature + top-k (0: off) + nucleus (top-p) sampling; temperature <= 0 is greedy.

    Only tokens within e^-30 of the most likely one are considered: together the rest hold less than 1e-8 of
    the mass, and skipping them makes sampling ~10x cheaper than a softmax over the whole vocabulary.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / np.float32(temperature)
    top = np.flatnonzero(z > z.max() - 30.0)
    probs = np.exp((z[top] - z[top].max()).astype(np.float64))
    order = np.argsort(-probs, kind="stable")
    top, probs = top[order], probs[order] / probs.sum()
    if 0 < top_k < len(top):
        top, probs = top[:top_k], probs[:top_k] / probs[:top_k].sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
    return int(top[rng.choice(len(top), p=probs)])


def _guided(req: GenRequest) -> bool:
    return bool(req.guide_prompt) and req.guidance > 0


def _same_prompts(a: GenRequest, b: GenRequest) -> bool:
    return (
        a.prompt == b.prompt
        and _guided(a) == _guided(b)
        and (not _guided(a) or a.guide_prompt == b.guide_prompt)
    )


def _feed(entries: list, tokens: list[int], pos: int, seq: int) -> tuple[int, int]:
    """Append a sequence's pending tokens to a batch; returns (row of its last token, next position)."""
    for j, tok in enumerate(tokens):
        entries.append((tok, pos + j, seq, j == len(tokens) - 1))
    return len(entries) - 1, pos + len(tokens)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


def target_logprobs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log softmax(logits)[target] per row, without materialising the whole log-softmax in float64."""
    m = logits.max(axis=-1).astype(np.float64)
    total = np.exp(logits - m[:, None].astype(logits.dtype)).sum(axis=-1, dtype=np.float64)
    return logits[np.arange(len(targets)), np.asarray(targets)].astype(np.float64) - m - np.log(total)


class Engine:
    """A GGUF loaded in llama.cpp with a multi-sequence context.

    Args:
        gguf_path: the model file.
        n_seq: sequences decoded together.
        ctx_per_seq: KV cache tokens per sequence (prompt + answer).
        lora_path: an optional GGUF LoRA adapter applied on top.
        n_threads: CPU threads (default: all cores).
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        *,
        n_seq: int = 16,
        ctx_per_seq: int = 1024,
        lora_path: str | os.PathLike | None = None,
        n_threads: int | None = None,
    ):
        import llama_cpp

        self._lc = llama_cpp
        self.path = Path(gguf_path)
        self.n_seq = n_seq
        self.ctx_per_seq = ctx_per_seq
        threads = n_threads or usable_cores()
        # The Llama object owns the model (and the adapter); we run our own multi-sequence context on it.
        self.llm = load_llama(
            self.path,
            n_ctx=64,
            n_batch=64,
            n_threads=threads,
            lora_path=str(lora_path) if lora_path else None,
        )
        self.n_ctx_train = self.llm._model.n_ctx_train()
        self.n_vocab = self.llm.n_vocab()
        self.n_batch = max(512, ctx_per_seq)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * ctx_per_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(512, self.n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = True
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            from .errors import ModelError

            raise ModelError(f"llama.cpp could not create a context for {self.path} (out of memory?).")
        if self.llm._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.llm._lora_adapter)
            scales = (ctypes.c_float * 1)(1.0)
            llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq)

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self._lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- low level -------------------------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def _clear(self, seq: int) -> None:
        self._lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def _decode(self, entries: list[tuple[int, int, int | tuple[int, ...], bool]]) -> None:
        """Decode (token, pos, seq or seqs, want_logits) entries in one call.

        A token given several sequences is stored once in the (unified) KV cache and seen by all of them:
        that is how a prompt shared by several responses is read only once."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            seqs = (seq,) if isinstance(seq, int) else seq
            b.n_seq_id[i] = len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            from .errors import ModelError

            raise ModelError(f"llama.cpp failed to decode a batch (code {rc}); lower the batch size.")

    def _logits(self, index: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- generation ------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], on_step: OnStep = None) -> Iterator[GenResult]:
        """Sample answers for all requests, n_seq at a time; yields each result as it finishes.

        `on_step` sees a DecodeStep after every decode step."""
        for item in self.generate_steps(requests):
            if not isinstance(item, DecodeStep):
                yield item
            elif on_step is not None:
                on_step(item)

    def generate_steps(self, requests: Sequence[GenRequest]) -> Iterator[GenResult | DecodeStep]:
        """`generate`, yielding a DecodeStep after every decode step as well as each finished result."""
        limit = self.ctx_per_seq
        for r in requests:
            for prompt in (r.prompt, r.guide_prompt or []):
                if len(prompt) + 1 > limit:
                    raise TooLongError(
                        f"A prompt of {len(prompt)} tokens does not fit the {limit}-token context per sequence."
                    )
        if any(_guided(r) for r in requests) and self.n_seq < 2:
            raise ValueError("guided sampling needs an engine with at least two sequences")
        # An empty cache for every call: where cells land in the unified KV cache changes the float results,
        # so each call must start from the same state to be reproducible (resume depends on it).
        self._lc.llama_memory_clear(self.mem, True)
        queue = list(requests)[::-1]
        slots: dict[int, _Slot] = {}
        free = list(range(self.n_seq))[::-1]
        budget_total = sum(r.max_tokens for r in requests)
        finished = finished_budget = generated = 0
        while queue or slots:
            # Admit new requests into free slots while their prompts fit one batch.
            budget = self.n_batch - sum(1 + (s.guide_seq is not None) for s in slots.values())
            while queue and free:
                req = queue.pop()
                need = len(req.prompt) + (len(req.guide_prompt) if _guided(req) else 0)
                width = 2 if _guided(req) else 1
                if need > budget or len(free) < width:
                    queue.append(req)
                    break
                leader = self._admit(req, free, slots)
                # The next requests with the same prompts (a plan's K candidates) share its prompt read.
                while queue and len(free) >= width and _same_prompts(queue[-1], req):
                    slots[leader].followers.append(self._admit(queue.pop(), free, slots, led=True))
                budget -= need
            entries: list[tuple[int, int, int | tuple[int, ...], bool]] = []
            for slot in slots.values():
                if slot.led:
                    continue  # fed by its leader (admitted, and so listed, before it)
                group = [slot, *(slots[f] for f in slot.followers)]
                seqs = tuple(s.seq for s in group)
                index, pos = _feed(entries, slot.pending, slot.pos, seqs[0] if len(seqs) == 1 else seqs)
                if slot.guide_seq is not None:
                    guides = tuple(s.guide_seq for s in group)
                    g_index, g_pos = _feed(
                        entries, slot.guide_pending, slot.guide_pos, guides[0] if len(guides) == 1 else guides
                    )
                for s in group:
                    s.batch_index, s.pos, s.pending, s.led = index, pos, [], False
                    if s.guide_seq is not None:
                        s.guide_index, s.guide_pos, s.guide_pending = g_index, g_pos, []
                slot.followers = []
            self._decode(entries)
            for seq in list(slots):
                slot = slots[seq]
                req = slot.request
                logits = self._logits(slot.batch_index)
                if slot.guide_seq is not None:
                    logits = guided_logits(logits, self._logits(slot.guide_index), req.guidance)
                logits = req.penalties.apply(logits, slot.tokens)
                tok = sample_token(logits, req.temperature, req.top_p, slot.rng, req.top_k)
                reason = None
                if self.is_eog(tok):
                    reason = "stop"
                else:
                    slot.tokens.append(tok)
                    longest = max(slot.pos, slot.guide_pos)
                    if len(slot.tokens) >= req.max_tokens or longest + 1 >= limit:
                        reason = "length"
                if reason:
                    del slots[seq]
                    free.append(seq)
                    if slot.guide_seq is not None:
                        free.append(slot.guide_seq)
                    finished += 1
                    finished_budget += req.max_tokens
                    generated += len(slot.tokens)
                    yield GenResult(
                        req.id, slot.tokens, self.detokenize(slot.tokens), reason, len(req.prompt)
                    )
                else:
                    slot.pending = [tok]
                    slot.guide_pending = [tok] if slot.guide_seq is not None else []
            active = sum(len(s.tokens) for s in slots.values())
            yield DecodeStep(
                "sampling",
                finished,
                len(requests),
                generated + active,
                finished_budget + active,
                budget_total,
            )

    def _admit(self, req: GenRequest, free: list[int], slots: dict, led: bool = False) -> int:
        """Give `req` a free sequence (two when guided), emptied; returns its sequence id."""
        seq = free.pop()
        self._clear(seq)
        slot = _Slot(req, np.random.default_rng(req.seed), pending=[] if led else list(req.prompt), led=led)
        slot.seq = seq
        if _guided(req):
            slot.guide_seq = free.pop()
            self._clear(slot.guide_seq)
            slot.guide_pending = [] if led else list(req.guide_prompt)
        slots[seq] = slot
        return seq

    def stream(
        self,
        prompt: list[int],
        *,
        max_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 0,
        penalties: Penalties = NO_PENALTIES,
        top_k: int = 0,
    ) -> Iterator[str]:
        """Stream one answer to prompt token ids as text pieces; complete UTF-8 characters only."""
        if len(prompt) + 1 > self.ctx_per_seq:
            raise TooLongError(
                f"The conversation is {len(prompt)} tokens long, more than the {self.ctx_per_seq}-token "
                "context allows; start a new one."
            )
        self._lc.llama_memory_clear(self.mem, True)
        rng = np.random.default_rng(seed)
        pending, pos, out, emitted = list(prompt), 0, [], ""
        for _ in range(max_tokens):
            entries = [(t, pos + j, 0, j == len(pending) - 1) for j, t in enumerate(pending)]
            self._decode(entries)
            pos += len(pending)
            logits = penalties.apply(self._logits(len(entries) - 1), out)
            tok = sample_token(logits, temperature, top_p, rng, top_k)
            if self.is_eog(tok) or pos + 1 >= self.ctx_per_seq:
                break
            out.append(tok)
            text = self.llm.detokenize(out).decode("utf-8", errors="ignore")
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
            pending = [tok]

    def stream_chat(self, messages: list[dict[str, str]], **sampling) -> Iterator[str]:
        """Stream the assistant's next turn for chat `messages` ({"role", "content"} dicts).

        The conversation is rendered with the model's own chat template; `sampling` takes `stream`'s
        keyword arguments (max_tokens, temperature, top_p, seed).
        """
        from .chat import chat_format

        yield from self.stream(chat_format(str(self.path)).conversation_ids(messages), **sampling)

    # -- scoring ---------------------------------------------------------------------------------

    def token_logprobs(
        self, items: Sequence[tuple[list[int], list[int]]], on_step: OnStep = None
    ) -> list[np.ndarray]:
        """Per-token log p(response token | prompt + earlier response tokens) for each (prompt, response).

        Items are decoded n_seq at a time; items of one decode that share a prompt (a pair's chosen and
        rejected answers, a prompt's K candidates) read that prompt once. A response's last token is never
        decoded: nothing is predicted from it. `on_step` sees a DecodeStep after every decode."""
        return drain(self.token_logprobs_steps(items), on_step)

    def token_logprobs_steps(
        self, items: Sequence[tuple[list[int], list[int]]]
    ) -> Generator[DecodeStep, None, list[np.ndarray]]:
        """`token_logprobs`, yielding a DecodeStep after every decode; returns the log-probs."""
        results: list[np.ndarray] = [np.zeros(0)] * len(items)
        work_total = sum(len(p) + len(r) for p, r in items)
        work_done = read = 0
        i = 0
        while i < len(items):
            prompts: dict[tuple[int, ...], list[int]] = {}  # prompt -> the sequences that share it
            members: list[int] = []  # item index of each sequence
            used = 0
            while i < len(items) and len(members) < self.n_seq:
                prompt, response = items[i]
                if not prompt:
                    raise ValueError("every scored response needs a non-empty prompt")
                n = len(prompt) + len(response)
                if n > self.ctx_per_seq:
                    raise TooLongError(
                        f"A prompt and response of {n} tokens exceed the {self.ctx_per_seq}-token context."
                    )
                key = tuple(prompt)
                cost = max(0, len(response) - 1) + (0 if key in prompts else len(prompt))
                if cost > self.n_batch:
                    raise TooLongError(f"{n} tokens exceed the batch size of {self.n_batch}.")
                if members and used + cost > self.n_batch:
                    break
                prompts.setdefault(key, []).append(len(members))
                members.append(i)
                used += cost
                i += 1
            entries: list[tuple[int, int, int | tuple[int, ...], bool]] = []
            rows: list[list[int]] = [[] for _ in members]  # batch rows whose logits predict each response
            for key, seqs in prompts.items():
                entries += [(tok, p, tuple(seqs), p == len(key) - 1) for p, tok in enumerate(key)]
                for s in seqs:
                    rows[s].append(len(entries) - 1)
            for s, idx in enumerate(members):
                prompt, response = items[idx]
                for k, tok in enumerate(response[:-1]):
                    rows[s].append(len(entries))
                    entries.append((tok, len(prompt) + k, s, True))
            self._lc.llama_memory_clear(self.mem, True)
            self._decode(entries)
            for s, idx in enumerate(members):
                response = items[idx][1]
                if response:
                    logits = np.stack([self._logits(r) for r in rows[s][: len(response)]])
                    results[idx] = target_logprobs(logits, response)
            read += len(entries)
            work_done += sum(len(items[idx][0]) + len(items[idx][1]) for idx in members)
            yield DecodeStep("scoring", i, len(items), read, work_done, work_total)
        return results

    def score_many(self, items: Sequence[tuple[list[int], list[int]]], on_step: OnStep = None) -> list[float]:
        """Summed log-probs of each response given its prompt."""
        return [float(x.sum()) for x in self.token_logprobs(items, on_step)]

    def score_many_steps(
        self, items: Sequence[tuple[list[int], list[int]]]
    ) -> Generator[DecodeStep, None, list[float]]:
        """`score_many`, yielding a DecodeStep after every decode; returns the summed log-probs."""
        lps = yield from self.token_logprobs_steps(items)
        return [float(x.sum()) for x in lps]

    def score(self, prompt: list[int], response: list[int]) -> float:
        return self.score_many([(prompt, response)])[0]
