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
from .errors import UserInputError, WorkspaceError
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
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .engine import Engine

        self._cf = chat_format(str(self.template_gguf))
        self._engine = Engine(self.model.path, n_seq=1, ctx_per_seq=4096, lora_path=self.model.lora)
        self._turn = 0

    def reply(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`; the full answer joins the history when the stream ends."""
        if not message.strip():
            raise UserInputError("The message is empty.")
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": message})
        ids = self._cf.tokenizer.encode_prompt(self._cf.template.render(messages, add_generation_prompt=True))
        pieces = []
        self._turn += 1
        for piece in self._engine.stream(
            ids, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self._turn
        ):
            pieces.append(piece)
            yield piece
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": "".join(pieces).strip()},
        ]

    def close(self) -> None:
        self._engine.close()
