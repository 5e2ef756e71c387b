"""The one source of truth for turning (context, prompt, response) into text and tokens.

Prompts are rendered with the GGUF's own Jinja chat template and tokenized with the GGUF's own
tokenizer through llama.cpp (a vocab-only load), so generation, training and export agree token for token.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import gguf_io
from .errors import ModelError

Message = dict[str, str]


def build_messages(context: str | None, prompt: str, response: str | None = None) -> list[Message]:
    """The conversation MIPO trains on: the context as the system turn (when given), then the question."""
    messages: list[Message] = []
    if context:
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

    def split(self, messages: list[Message]) -> tuple[str, str]:
        """Split a conversation ending in an assistant turn into (prompt text, response text).

        The response text includes the template's end-of-turn marker, so a trained model learns to stop.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("split() needs a conversation that ends with the assistant's answer")
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TemplateError(
                "The model's chat template renders the answer in a way mipo-local cannot split."
            )
        return prompt, full[len(prompt) :].rstrip("\n")


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

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Tokenize with special tokens parsed (template markers such as <|im_start|> become one id)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a rendered prompt, adding BOS only when the model wants one and the template did not."""
        ids = self.encode(text)
        if self.add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


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

    def prompt_ids(self, context: str | None, prompt: str) -> list[int]:
        return self.tokenizer.encode_prompt(self.prompt_text(context, prompt))

    def response_ids(self, context: str | None, prompt: str, response: str) -> list[int]:
        """Token ids of `response` as the template writes it after the prompt (end-of-turn included)."""
        _, text = self.template.split(build_messages(context, prompt, response))
        return self.tokenizer.encode(text)

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
