"""A chat session on a GGUF through llama.cpp: history, the user's contexts as system turn, streaming.

Used by `mipo-local chat` and the app's Chat screen. The model is the exported file (what the user runs)
or the base, so `/compare` can show both answers to the same message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import modelsource
from .chat import chat_format
from .engine import Penalties
from .errors import UserInputError, WorkspaceError
from .settings import AnswerSettings
from .validation import PROMPT_CHARS_MAX, check_text, require_int, require_number
from .workspace import Workspace


@dataclass
class ModelChoice:
    label: str
    path: Path
    lora: Path | None = None


def resolve_chat_model(ws: Workspace, spec: str) -> ModelChoice:
    """`base`, `latest` (the newest export) or a path to a GGUF."""
    base = modelsource.base_model(ws)
    if spec == "base":
        return ModelChoice("base", base.file)
    if spec == "latest":
        from .evaluate import export_engine_args, latest_export

        if not ws.query("SELECT 1 FROM exports LIMIT 1"):
            raise WorkspaceError(
                "There is no export to chat with yet.",
                hint="Run `mipo-local export` first, or chat with the base model: --model base.",
            )
        export = latest_export(ws)
        path, lora = export_engine_args(ws, export)
        return ModelChoice(f"export #{export['id']}", path, lora)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserInputError(f"--model must be base, latest or a GGUF file; {path} does not exist.")
    from .gguf_io import read_info

    read_info(path)
    return ModelChoice(path.name, path)


def system_from_contexts(ws: Workspace) -> str | None:
    texts = [c.text for c in ws.contexts()]
    return "\n\n".join(texts) if texts else None


@dataclass
class ChatSession:
    model: ModelChoice
    template_gguf: Path  # the base model's file: one chat template for every stage
    system: str | None = None
    temperature: float = AnswerSettings.temperature
    top_p: float = AnswerSettings.top_p
    max_tokens: int = AnswerSettings.max_tokens
    top_k: int = AnswerSettings.top_k
    penalties: Penalties = field(
        default_factory=lambda: Penalties(AnswerSettings.repeat_penalty, AnswerSettings.repeat_last_n)
    )
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .engine import Engine

        require_number("--temperature", self.temperature, 0.0, 5.0)
        require_number("--top-p", self.top_p, 0.0, 1.0, low_open=True)
        require_int("--max-tokens", self.max_tokens, 1, 8192)

        self._cf = chat_format(str(self.template_gguf))
        self._engine = Engine(self.model.path, n_seq=1, ctx_per_seq=4096, lora_path=self.model.lora)
        self._turn = 0

    def reply(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`; the full answer joins the history when the stream ends."""
        if not message.strip():
            raise UserInputError("The message is empty.")
        message = check_text(message, "The message", PROMPT_CHARS_MAX)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": message})
        ids = self._cf.conversation_ids(messages)
        pieces = []
        self._turn += 1
        for piece in self._engine.stream(
            ids,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self._turn,
            penalties=self.penalties,
            top_k=self.top_k,
        ):
            pieces.append(piece)
            yield piece
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": "".join(pieces).strip()},
        ]

    def close(self) -> None:
        self._engine.close()
