"""The one source of truth for turning (context, prompt, response) into text and tokens.

Prompts are rendered with the GGUF's own Jinja chat template and tokenized with the GGUF's own
tokenizer through llama.cpp (a vocab-only load), so generation, training and export agree token for token.

User text is data, never control. A conversation is rendered twice, once with each message's content
replaced by a placeholder, which tells the template's own markup apart from the user's text
(ChatTemplate.render_segments). Only the markup's special-token strings become special tokens; contexts,
prompts, answers and chat turns are tokenized as plain text, so `<|im_end|>` typed by a user stays seven
ordinary tokens (Tokenizer.encode_segments).
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import gguf_io
from .errors import ModelError

Message = dict[str, str]
# (text, is_user_text): a rendered conversation cut into the template's markup and the messages' contents.
Segment = tuple[str, bool]

# A message's content during the marked render: private-use characters no template adds or strips.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


def build_messages(
    context: str | None, prompt: str, response: str | None = None, *, context_turn: str = "system"
) -> list[Message]:
    """The conversation MIPO trains on: the context as the system turn (when given), then the question.
    `context_turn="user"` writes the context at the head of the question's turn instead, the form `pairs`
    samples answers with (settings.PairSettings.context_turn)."""
    messages: list[Message] = []
    if context and context_turn == "user":
        prompt = f"{context}\n\n{prompt}"
    elif context:
        messages.append({"role": "system", "content": context})
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


class TemplateError(ModelError):
    pass


def _raise_exception(message: str) -> None:
    raise TemplateError(f"The model's chat template refused the conversation: {message}")


@dataclass
class ChatTemplate:
    """A GGUF chat template compiled once. Renders like transformers' apply_chat_template."""

    source: str
    bos_token: str
    eos_token: str

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as err:
            raise TemplateError(f"The model's chat template does not parse: {err}.") from err

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as err:
            raise TemplateError(f"The model's chat template failed to render: {err}.") from err

    def render_segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        """The rendered conversation cut into the template's markup and the messages' own text.

        The segments' texts join to exactly what render() returns. The template runs a second time with
        each content replaced by a placeholder; whatever it writes around the placeholders is markup.

        Raises:
            TemplateError: the template changes a message's text beyond trimming it, or renders a
                conversation differently once its text is replaced (it reads the text as markup).
        """
        real = self.render(messages, add_generation_prompt)
        marked = self.render(
            [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)], add_generation_prompt
        )
        # [markup, message index, markup, message index, ..., markup]
        pieces = _PLACEHOLDER_RE.split(marked)
        segments = _align(real, pieces, [str(m["content"]) for m in messages])
        if segments is None:
            raise TemplateError(
                "The model's chat template treats part of a message as markup, so mipo-local cannot keep "
                "that text plain; remove template-like markers (such as </think>) from it."
            )
        return [s for s in segments if s[0]]

    def split_segments(self, messages: list[Message]) -> tuple[list[Segment], list[Segment]]:
        """Split a conversation ending in an assistant turn into (prompt segments, response segments).

        The response includes the template's end-of-turn marker, so a trained model learns to stop.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("split needs a conversation that ends with the assistant's answer")
        prompt = self.render_segments(messages[:-1], add_generation_prompt=True)
        full = self.render_segments(messages, add_generation_prompt=False)
        prompt_text = "".join(text for text, _ in prompt)
        if not "".join(text for text, _ in full).startswith(prompt_text):
            raise TemplateError(
                "The model's chat template renders the answer in a way mipo-local cannot split."
            )
        return prompt, _rstrip_newlines(_after(full, len(prompt_text)))

    def split(self, messages: list[Message]) -> tuple[str, str]:
        """split_segments as plain strings: (prompt text, response text)."""
        prompt, response = self.split_segments(messages)
        return "".join(t for t, _ in prompt), "".join(t for t, _ in response)


def _align(real: str, pieces: list[str], contents: list[str]) -> list[Segment] | None:
    """Match the marked render's pieces against the real render: markup must be equal, and each
    placeholder stands for its content as written or trimmed (Jinja's `| trim`). None when nothing fits."""

    def walk(pos: int, k: int) -> list[Segment] | None:
        markup = pieces[k]
        if not real.startswith(markup, pos):
            return None
        pos += len(markup)
        if k == len(pieces) - 1:
            return [(markup, False)] if pos == len(real) else None
        content = contents[int(pieces[k + 1])]
        for variant in dict.fromkeys((content, content.strip())):
            if real.startswith(variant, pos):
                rest = walk(pos + len(variant), k + 2)
                if rest is not None:
                    return [(markup, False), (variant, True), *rest]
        return None

    return walk(0, 0)


def _after(segments: list[Segment], offset: int) -> list[Segment]:
    """The segments from character `offset` of their joined text on."""
    out, pos = [], 0
    for text, user in segments:
        end = pos + len(text)
        if end > offset:
            out.append((text[max(0, offset - pos) :], user))
        pos = end
    return out


def _rstrip_newlines(segments: list[Segment]) -> list[Segment]:
    out = list(segments)
    while out and out[-1][0].endswith("\n"):
        text, user = out.pop()
        if text.rstrip("\n"):
            out.append((text.rstrip("\n"), user))
            break
    return out


class Tokenizer:
    """The GGUF's tokenizer, through a vocab-only llama.cpp load (fast, no weights in memory)."""

    def __init__(self, gguf_path: str | os.PathLike):
        from .llama_loader import load_llama  # heavy import kept local so `mipo-local --help` stays instant

        self.path = Path(gguf_path)
        self._llm = load_llama(self.path, vocab_only=True)
        self.bos_id = self._llm.token_bos()
        self.eos_id = self._llm.token_eos()
        self.n_vocab = self._llm.n_vocab()
        # The GGUF's scalar keys as llama.cpp read them (strings): no second parse of the file, whose
        # 49k-token vocabulary costs gguf-py 0.7 s.
        self.metadata: dict[str, str] = dict(self._llm.metadata)
        self.add_bos = self.metadata.get(gguf.Keys.Tokenizer.ADD_BOS, "false") == "true"
        self.bos_text = self.decode([self.bos_id]) if self.bos_id >= 0 else ""
        self._special = _special_tokens(self._llm)
        self.special_ids = frozenset(token_id for token_id, _ in self._special.values())
        self._special_re = _alternation(self._special)

    def encode_text(self, text: str) -> list[int]:
        """Plain text: a special-token string in it (`<|im_end|>`) stays ordinary text.

        llama.cpp's plain mode still matches the vocabulary's user-defined tokens (Gemma's runs of
        newlines, for example), as the model's own tokenizer does; one that is also an end-of-generation
        or control token is split instead, so it can never end up as that id.
        """
        ids = self._tokenize(text, special=False)
        if self.special_ids.isdisjoint(ids) or self._special_re is None:
            return ids
        cuts = sorted({0, len(text), *(m.start() + 1 for m in self._special_re.finditer(text))})
        ids = [
            t for a, b in zip(cuts, cuts[1:], strict=False) for t in self._tokenize(text[a:b], special=False)
        ]
        if not self.special_ids.isdisjoint(ids):
            raise TemplateError(f"{self.path.name}'s tokenizer cannot keep this text plain: {text[:60]!r}.")
        return ids

    def encode_markup(self, text: str) -> list[int]:
        """Text mipo-local wrote itself, special-token strings parsed: how llama.cpp and Ollama read a
        whole rendered prompt. Never for text that holds the user's words; see encode_segments."""
        return self._tokenize(text, special=True)

    def encode_segments(self, segments: list[Segment]) -> list[int]:
        """A rendered conversation: the markup's special-token strings become their ids, everything else
        (the markup's plain text and every user segment) is plain text.

        Text between two special tokens is tokenized in one piece, markup and user text together, so a
        conversation without special-token strings in its user text gets exactly the ids llama.cpp gives
        its whole rendered text."""
        ids: list[int] = []
        run: list[str] = []

        def flush(strip_right: bool = False) -> None:
            text = "".join(run)
            run.clear()
            text = text.rstrip() if strip_right else text
            if text:
                ids.extend(self.encode_text(text))

        for text, user in segments:
            if user or self._special_re is None:
                run.append(text)
                continue
            pos = 0
            for m in self._special_re.finditer(text):
                token_id, attr = self._special[m.group()]
                run.append(text[pos : m.start()])
                flush(strip_right=bool(attr & _ATTR_LSTRIP))
                ids.append(token_id)
                pos = m.end()
                if attr & _ATTR_RSTRIP:  # llama.cpp drops the white space after such a token
                    while pos < len(text) and text[pos].isspace():
                        pos += 1
            run.append(text[pos:])
        flush()
        return ids

    def special_strings(self, text: str) -> list[str]:
        """The model's special-token strings that occur in `text`, in order of first appearance."""
        found = [m.group() for m in self._special_re.finditer(text)] if self._special_re else []
        return list(dict.fromkeys(found))

    def with_bos(self, ids: list[int]) -> list[int]:
        """Add BOS only when the model wants one and the template did not write it."""
        if self.add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return ids

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def decode(self, ids: list[int]) -> str:
        return self._llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


_ATTR_CONTROL, _ATTR_LSTRIP, _ATTR_RSTRIP = 8, 128, 256  # llama.cpp's llama_token_attr bits


def _special_tokens(llm) -> dict[str, tuple[int, int]]:
    """The vocabulary's control tokens (and end-of-generation tokens of any kind) by text: (id, attributes).

    These are what a rendered template's markup may contain and user text must never become."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    out: dict[str, tuple[int, int]] = {}
    for token_id in range(llm.n_vocab()):
        attr = int(llama_cpp.llama_vocab_get_attr(vocab, token_id))
        if attr & _ATTR_CONTROL or llama_cpp.llama_vocab_is_eog(vocab, token_id):
            text = llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")
            if text and text not in out:
                out[text] = (token_id, attr)
    return out


def _alternation(texts) -> re.Pattern | None:
    """One regex matching any of `texts`, longest first (as llama.cpp's special-token partition does)."""
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


@dataclass
class EncodedPair:
    """One preference pair as token ids: the shared prompt and the two responses.

    `anchor_prompt` / `anchor_response`: a response once more under a context that is not the user's (by
    default the chosen answer with no system turn; train/batching.anchor_sequence). Training's
    other-context KL anchor keeps the model's answers there where the base had them.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    anchor_prompt: list[int] | None = None
    anchor_response: list[int] | None = None


class ChatFormat:
    """Template + tokenizer of one GGUF: what every stage uses to turn text into model input."""

    def __init__(self, gguf_path: str | os.PathLike):
        self.path = Path(gguf_path)
        gguf_io.check_gguf_file(self.path)  # clear errors for a missing or foreign file, before llama.cpp's
        self.tokenizer = Tokenizer(self.path)
        source = self.tokenizer.metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        if not source:
            raise ModelError(
                f"{self.path} has no chat template (tokenizer.chat_template); pick an instruct model."
            )
        eos_id = self.tokenizer.eos_id
        eos_text = self.tokenizer.decode([eos_id]) if eos_id >= 0 else ""
        self.template = ChatTemplate(source, self.tokenizer.bos_text, eos_text)

    def prompt_text(self, context: str | None, prompt: str) -> str:
        return self.template.render(build_messages(context, prompt), add_generation_prompt=True)

    def conversation_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation up to the assistant's next turn; the messages' text stays text."""
        segments = self.template.render_segments(messages, add_generation_prompt=True)
        return self.tokenizer.with_bos(self.tokenizer.encode_segments(segments))

    def prompt_ids(self, context: str | None, prompt: str, *, context_turn: str = "system") -> list[int]:
        return self.conversation_ids(build_messages(context, prompt, context_turn=context_turn))

    def response_ids(self, context: str | None, prompt: str, response: str) -> list[int]:
        """Token ids of `response` as the template writes it after the prompt (end-of-turn included)."""
        _, segments = self.template.split_segments(build_messages(context, prompt, response))
        return self.tokenizer.encode_segments(segments)

    def encode_pair(self, context: str | None, prompt: str, chosen: str, rejected: str) -> EncodedPair:
        return EncodedPair(
            prompt=self.prompt_ids(context, prompt),
            chosen=self.response_ids(context, prompt, chosen),
            rejected=self.response_ids(context, prompt, rejected),
        )


@functools.lru_cache(maxsize=4)
def chat_format(gguf_path: str) -> ChatFormat:
    """A cached ChatFormat per model file (vocab loads take ~0.5 s)."""
    return ChatFormat(gguf_path)


# Free the cached vocab loads while llama.cpp's module is still whole: collected during interpreter
# shutdown, llama-cpp-python's finalizer finds its helpers gone and prints an ignored exception.
atexit.register(chat_format.cache_clear)
