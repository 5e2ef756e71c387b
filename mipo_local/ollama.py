"""Ollama: translate the GGUF's Jinja chat template to a Go TEMPLATE, write the Modelfile, run `ollama create`.

The translation does not match template strings. It renders probe conversations with the model's own
template and reads the turn structure off the output: what comes before and after each role's content,
the generation prompt, and how a system turn is written (its own turn, as ChatML and Llama 3 do, or glued
to the first user turn, as Gemma does; with or without a built-in default system turn, as SmolLM2 and
Qwen have). The Go template built from that structure is then rendered (gotemplate.py) on a set of
conversations and must reproduce the Jinja output exactly; otherwise export stops with an ExportError
instead of shipping a template that would quietly prompt the model differently from training.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf

from . import gguf_io, gotemplate
from .chat import ChatTemplate, Message, TemplateError
from .errors import ExportError, UserInputError
from .fsutil import atomic_write_text
from .settings import AnswerSettings

MODELFILE = "Modelfile"

# Probe contents: distinct words that no chat template writes itself and none trims or escapes.
_S, _U1, _A1, _U2, _A2, _U3 = "qqsysq", "qqoneq", "qqansq", "qqtwoq", "qqrepq", "qqthrq"


@dataclass
class TurnFormat:
    """A chat template's turn structure, read off rendered probe conversations."""

    family: str  # chatml | llama3 | gemma | generic: a name for messages, derived from the structure
    system_mode: str  # "turn": own turn; "first_user": written inside the first user turn
    no_system: str  # what opens the prompt when there is no system message (header, default system turn)
    system_prefix: str  # "turn": text before the system content (header included); "first_user": the header
    system_suffix: str  # "turn": text after the system content; "first_user": separator before the user text
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str  # the generation prompt (add_generation_prompt=True)
    stops: list[str]


def _strip_bos(text: str, bos: str) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _cut(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ExportError(
            f"The model's chat template cannot be translated for Ollama: it does not write the {what} "
            "exactly once, as given."
        )
    head, _, tail = text.partition(marker)
    return head, tail


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise ExportError(f"The model's chat template cannot be translated for Ollama: {why}.")


def read_turn_format(template: ChatTemplate, *, add_bos: bool) -> TurnFormat:
    """Derive the turn structure of `template` by rendering probes.

    `add_bos`: the tokenizer adds BOS itself (Ollama and llama.cpp both do), so a leading BOS text written
    by the template is left out of the Go template.

    Raises:
        ExportError: the template's output does not fit a structure a Go template can express.
    """
    bos = template.bos_token if add_bos else ""

    def render(msgs: list[tuple[str, str]], gen: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in msgs]
        try:
            return _strip_bos(template.render(messages, add_generation_prompt=gen), bos)
        except TemplateError as err:
            raise ExportError(f"The model's chat template cannot be translated for Ollama: {err}") from err

    u1, a1, u2, s = ("user", _U1), ("assistant", _A1), ("user", _U2), ("system", _S)
    n_u = render([u1], False)
    g_u = render([u1], True)
    _need(g_u.startswith(n_u) and len(g_u) > len(n_u), "it has no generation prompt")
    generation = g_u[len(n_u) :]
    head_u, user_suffix = _cut(n_u, _U1, "user message")
    n_ua = render([u1, a1], False)
    _need(n_ua.startswith(n_u), "an assistant answer changes the text of the turns before it")
    assistant_prefix, assistant_suffix = _cut(n_ua[len(n_u) :], _A1, "assistant message")
    g_uau = render([u1, a1, u2], True)
    _need(g_uau.startswith(n_ua), "a second question changes the text of the turns before it")
    user_prefix, tail = _cut(g_uau[len(n_ua) :], _U2, "second user message")
    _need(tail == user_suffix + generation, "the last user turn is written differently from the first")
    _need(head_u.endswith(user_prefix), "the first user turn is written differently from later ones")
    no_system = head_u[: len(head_u) - len(user_prefix)]

    system_prefix, rest = _cut(render([s, u1], True), _S, "system message")
    middle, tail = _cut(rest, _U1, "user message after a system message")
    _need(tail == user_suffix + generation, "a system message changes the user turn after it")
    if middle.endswith(user_prefix):
        mode, system_suffix = "turn", middle[: len(middle) - len(user_prefix)]
    elif (
        system_prefix.endswith(user_prefix)
        and system_prefix[: len(system_prefix) - len(user_prefix)] == no_system
    ):
        mode, system_suffix = "first_user", middle
        system_prefix = no_system
    else:
        raise ExportError(
            "The model's chat template cannot be translated for Ollama: it writes the system message "
            "neither as a turn of its own nor inside the first user turn."
        )
    stops = [t for t in dict.fromkeys([assistant_suffix.strip(), template.eos_token.strip()]) if t]
    return TurnFormat(
        family=_family(user_prefix),
        system_mode=mode,
        no_system=no_system,
        system_prefix=system_prefix,
        system_suffix=system_suffix,
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_prefix=assistant_prefix,
        assistant_suffix=assistant_suffix,
        generation=generation,
        stops=stops,
    )


def _family(user_prefix: str) -> str:
    for marker, name in (
        ("<|im_start|>", "chatml"),
        ("<|start_header_id|>", "llama3"),
        ("<start_of_turn>", "gemma"),
    ):
        if marker in user_prefix:
            return name
    return "generic"


def _lit(text: str) -> str:
    """Literal text inside a Go template: as is, unless it contains an action opener."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{{" in text else text


def go_template(fmt: TurnFormat) -> str:
    """The Ollama TEMPLATE (Go text/template) for a turn format."""
    turns = (
        '{{ if eq .Role "user" }}' + _lit(fmt.user_prefix) + "{{ .Content }}" + _lit(fmt.user_suffix)
        + '{{ else if eq .Role "assistant" }}' + _lit(fmt.assistant_prefix) + "{{ .Content }}"
        + _lit(fmt.assistant_suffix) + "{{ end }}"
    )  # fmt: skip
    if fmt.system_mode == "turn":
        # Ollama passes the system messages joined as .System (and also inside .Messages, skipped here).
        opening = (
            "{{ if .System }}" + _lit(fmt.system_prefix) + "{{ .System }}" + _lit(fmt.system_suffix)
            + ("{{ else }}" + _lit(fmt.no_system) if fmt.no_system else "") + "{{ end }}"
        )  # fmt: skip
        return opening + "{{ range .Messages }}" + turns + "{{ end }}" + _lit(fmt.generation)
    # first_user: the system text opens the first user turn; $system is emptied once written.
    first_user = (
        '{{ if eq .Role "user" }}' + _lit(fmt.user_prefix)
        + "{{ if $system }}{{ $system }}" + _lit(fmt.system_suffix) + '{{ $system = "" }}{{ end }}'
        + "{{ .Content }}" + _lit(fmt.user_suffix)
        + '{{ else if eq .Role "assistant" }}' + _lit(fmt.assistant_prefix) + "{{ .Content }}"
        + _lit(fmt.assistant_suffix) + "{{ end }}"
    )  # fmt: skip
    return (
        "{{ $system := .System }}" + _lit(fmt.system_prefix) + "{{ range .Messages }}" + first_user + "{{ end }}"
        + _lit(fmt.generation)
    )  # fmt: skip


def ollama_values(messages: list[Message], modelfile_system: str | None = None) -> dict:
    """What Ollama hands a Messages template: the Modelfile SYSTEM added when the chat has none,
    consecutive same-role messages merged, and all system messages joined as .System."""
    msgs = [dict(m) for m in messages]
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    systems = [m["content"] for m in msgs if m["role"] == "system"]
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(systems), "Messages": collated}


# Conversations every translation must reproduce exactly (all end in a user turn, as Ollama prompts do).
CHECK_CONVERSATIONS: list[list[Message]] = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are terse.\nAnswer in French."}, {"role": "user", "content": "Hi?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "I am Ana, a chef."},
        {"role": "user", "content": "Dinner idea?"},
        {"role": "assistant", "content": "Lentil soup.\n\nEasy."},
        {"role": "user", "content": "Something {{ quicker }}?"},
        {"role": "assistant", "content": "Toast."},
        {"role": "user", "content": "Thanks!"},
    ],
]


def jinja_prompt(template: ChatTemplate, messages: list[Message], *, add_bos: bool) -> str:
    """The prompt text llama.cpp gets for `messages`, without the BOS the tokenizer adds itself."""
    bos = template.bos_token if add_bos else ""
    return _strip_bos(template.render(messages, add_generation_prompt=True), bos)


def translate(template: ChatTemplate, *, add_bos: bool) -> tuple[str, TurnFormat]:
    """The Ollama TEMPLATE for `template`, verified to render CHECK_CONVERSATIONS identically.

    Raises:
        ExportError: the template cannot be translated faithfully.
    """
    fmt = read_turn_format(template, add_bos=add_bos)
    source = go_template(fmt)
    for messages in CHECK_CONVERSATIONS:
        want = jinja_prompt(template, messages, add_bos=add_bos)
        got = gotemplate.render(source, ollama_values(messages))
        if got != want:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            raise ExportError(
                f"The model's chat template ({fmt.family}) cannot be translated for Ollama: the translation "
                f"differs from it at character {at} of a {len(messages)}-message conversation."
            )
    return source, fmt


def template_from_reader(reader: gguf.GGUFReader, source: Path) -> tuple[ChatTemplate, bool]:
    """(the GGUF's chat template, whether its tokenizer adds BOS), read from an open reader.

    The same template and special-token texts ChatFormat uses, without loading the vocabulary in
    llama.cpp, so an adapter-only export stays fast.
    """
    text = gguf_io.field_value(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    if not text:
        raise ExportError(f"{source} has no chat template, so no Ollama template can be derived from it.")
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)

    def token_text(key: str) -> str:
        token_id = gguf_io.field_value(reader, key)
        return tokens.contents(int(token_id)) if tokens is not None and token_id is not None else ""

    add_bos = bool(gguf_io.field_value(reader, gguf.Keys.Tokenizer.ADD_BOS, False))
    bos = token_text(gguf.Keys.Tokenizer.BOS_ID)
    return ChatTemplate(text, bos, token_text(gguf.Keys.Tokenizer.EOS_ID)), add_bos


_NAME_LIMIT = 128  # Ollama's limit on a whole model name (types/model/name.go, MaxNamePartLen)
_NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")


def check_model_name(name: str) -> None:
    """Refuse a name that `ollama create` would refuse: [host/][namespace/]model[:tag], each part of
    letters, digits, `_`, `.` and `-` (no `.` in the namespace, no `..`), 128 characters at most.

    Raises:
        UserInputError: naming what is wrong, before any export work starts.
    """
    shown = name if len(name) <= 60 else name[:57] + "..."
    problem = None
    model, _, tag = name.rpartition(":") if ":" in name else (name, "", "")
    parts = model.split("/")
    if not name:
        problem = "it is empty"
    elif len(name) > _NAME_LIMIT:
        problem = f"it is longer than {_NAME_LIMIT} characters"
    elif len(parts) > 3 or not all(parts) or (":" in name and not tag):
        problem = "write it as [namespace/]name[:tag]"
    elif not all(_NAME_PART.fullmatch(p) for p in [*parts, *([tag] if tag else [])]):
        problem = "use only letters, digits, '_', '.' and '-' (no spaces)"
    elif ".." in name or (len(parts) >= 2 and "." in parts[-2]):
        problem = "it has '..' or a '.' in its namespace"
    if problem:
        raise UserInputError(f"--ollama {shown!r} is not a name Ollama accepts: {problem}.")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(
            f'The {what} contains """, which a Modelfile cannot hold; remove it and export again.'
        )
    return f'"""{text}"""'


def sampling_parameters(answers: AnswerSettings | None = None) -> dict[str, float | int]:
    """The PARAMETERs that make Ollama sample as `mipo-local chat` does (Ollama's own names)."""
    a = answers or AnswerSettings()
    return {
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "repeat_penalty": a.repeat_penalty,
        "repeat_last_n": a.repeat_last_n,
        "num_predict": a.max_tokens,
    }


def modelfile_text(
    *,
    from_: str,
    template: str,
    stops: list[str],
    system: str | None,
    adapter: str | None = None,
    parameters: dict[str, float | int] | None = None,
) -> str:
    """The Modelfile: FROM, optional ADAPTER, TEMPLATE, PARAMETER lines (stops, then the sampling
    settings: `sampling_parameters()` unless given), optional SYSTEM."""
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {_quoted(template, 'chat template')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    params = sampling_parameters() if parameters is None else parameters
    lines += [f"PARAMETER {name} {value:g}" if isinstance(value, float) else f"PARAMETER {name} {value}"
              for name, value in params.items()]  # fmt: skip
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system text (your contexts)')}")
    return "\n".join(lines) + "\n"


def write_modelfile(directory: Path, text: str) -> Path:
    """Write `directory`/Modelfile atomically, owner-only (it holds the user's contexts)."""
    path = Path(directory) / MODELFILE
    atomic_write_text(path, text)
    return path


def create_command(name: str, modelfile: Path) -> list[str]:
    return ["ollama", "create", name, "-f", str(modelfile)]


def create(name: str, modelfile: Path) -> tuple[bool, str]:
    """Run `ollama create` when the ollama CLI is installed.

    Returns (created, message): the message is the exact command to run when ollama is missing, or its
    error output when it failed.
    """
    cmd = create_command(name, modelfile)
    shown = shlex.join(cmd)
    if shutil.which("ollama") is None:
        return False, f"Ollama is not installed here; to add the model to Ollama run: {shown}"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=modelfile.parent, timeout=3600)
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"`{shown}` could not run ({err})."
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"`{shown}` failed: {last[0]}"
    return True, f"Created the Ollama model '{name}' (run it with `ollama run {name}`)."
