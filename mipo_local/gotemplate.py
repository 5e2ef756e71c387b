"""A small renderer for the subset of Go's text/template that Ollama chat templates use.

It exists so tests (and the export itself) can prove that a TEMPLATE written into a Modelfile renders the
same prompt text as the GGUF's Jinja chat template. Supported: text, `{{- ` / ` -}}` trimming, comments,
`{{ if }}` / `{{ else if }}` / `{{ else }}` / `{{ end }}`, `{{ range [$i, $v :=] PIPE }}` with `{{ else }}`,
variables (`$x := v`, `$x = v`, `$`, `$x.Field`), fields (`.Role`, `.Content`, `.System`, `.Prompt`, `$.X`),
string / number / bool literals, parentheses and the functions eq, ne, and, or, not, len, index.
Anything else raises GoTemplateError rather than rendering something subtly different from Go.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    pass


NO_VALUE = "<no value>"  # what Go prints for a missing map key with missingkey=zero (Ollama's setting)


# -- lexing: split the source into text and actions ------------------------------------------------------


def _split(source: str) -> list[tuple[str, str]]:
    """[(kind, value)] with kind 'text' or 'action'; trim markers applied to neighbouring text."""
    parts: list[tuple[str, str]] = []
    i = 0
    trim_next = False
    while True:
        start = source.find("{{", i)
        text = source[i:] if start < 0 else source[i:start]
        if trim_next:
            text = text.lstrip()
        if start < 0:
            parts.append(("text", text))
            return parts
        j = start + 2
        trim_prev = source.startswith("- ", j) or source.startswith("-\n", j)
        if trim_prev:
            text = text.rstrip()
            j += 1
        parts.append(("text", text))
        end = _action_end(source, j)
        body = source[j:end]
        trim_next = body.endswith(" -") or body.endswith("\n-")
        if trim_next:
            body = body[:-1]
        parts.append(("action", body.strip()))
        i = end + 2


def _action_end(source: str, j: int) -> int:
    """Index of the `}}` closing the action starting at `j`, skipping quoted strings."""
    quote = None
    k = j
    while k < len(source):
        ch = source[k]
        if quote:
            if ch == "\\" and quote == '"':
                k += 2
                continue
            if ch == quote:
                quote = None
        elif ch in '"`':
            quote = ch
        elif source.startswith("}}", k):
            return k
        k += 1
    raise GoTemplateError("unclosed action: a '{{' has no matching '}}'")


_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<decl>:=)|(?P<assign>=)'
    r"|(?P<lp>\()|(?P<rp>\))|(?P<comma>,)|(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
    r"|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse {expr[pos:]!r} in action {{{{ {expr} }}}}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


# -- parsing into a small tree ---------------------------------------------------------------------------


@dataclass
class _Pipe:
    tokens: list[tuple[str, str]]
    decl: list[str] = field(default_factory=list)  # variables declared (:=) or assigned (=)
    assign: bool = False


@dataclass
class _If:
    branches: list[tuple[_Pipe, list]]
    otherwise: list | None = None


@dataclass
class _Range:
    pipe: _Pipe
    body: list
    otherwise: list | None = None


def _pipe(expr: str) -> _Pipe:
    toks = _tokens(expr)
    for k, (kind, _) in enumerate(toks):
        if kind in ("decl", "assign"):
            names = [v for t, v in toks[:k] if t == "var"]
            if not names or any(t not in ("var", "comma") for t, _ in toks[:k]):
                raise GoTemplateError(f"bad variable declaration in {{{{ {expr} }}}}")
            return _Pipe(toks[k + 1 :], names, kind == "assign")
    return _Pipe(toks)


def parse(source: str) -> list:
    """Parse `source` into a node list (text strings, _Pipe actions, _If, _Range)."""
    parts = _split(source)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal pos
        nodes: list = []
        while pos < len(parts):
            kind, value = parts[pos]
            pos += 1
            if kind == "text":
                if value:
                    nodes.append(value)
                continue
            if value.startswith("/*"):
                continue
            word = value.split(None, 1)[0] if value else ""
            rest = value[len(word) :].strip()
            if word in ("end", "else") and word in stop:
                return nodes, value
            if word == "if":
                nodes.append(_if(rest))
            elif word == "range":
                nodes.append(_range(rest))
            elif word in ("end", "else", "with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"unsupported or misplaced {{{{ {value} }}}}")
            else:
                nodes.append(_pipe(value))
        if stop:
            raise GoTemplateError("a block is missing its {{ end }}")
        return nodes, ""

    def _if(cond: str) -> _If:
        node = _If([])
        while True:
            body, closer = block(("end", "else"))
            node.branches.append((_pipe(cond), body))
            if closer == "end":
                return node
            tail = closer[len("else") :].strip()
            if tail.startswith("if "):
                cond = tail[3:]
                continue
            node.otherwise, closer = block(("end",))
            return node

    def _range(expr: str) -> _Range:
        body, closer = block(("end", "else"))
        otherwise = None
        if closer != "end":
            otherwise, _ = block(("end",))
        return _Range(_pipe(expr), body, otherwise)

    nodes, _ = block(())
    return nodes


# -- evaluation -------------------------------------------------------------------------------------------


def truth(value: Any) -> bool:
    """Go's notion of true: not false, 0, nil or empty."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def _field(value: Any, names: list[str]) -> Any:
    for name in names:
        if value is None:
            raise GoTemplateError(f"nil pointer evaluating .{name}")
        if isinstance(value, dict):
            value = value.get(name)
        else:
            value = getattr(value, name, None)
    return value


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    return any(a == b for b in others)


class _Scope:
    def __init__(self, root: Any):
        self.root = root
        self.stack: list[dict[str, Any]] = [{"$": root}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.stack):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.stack):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"assignment to undefined variable {name}")


_FUNCS = {
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
    "index": lambda a, *keys: _index(a, keys),
}


def _index(value: Any, keys: tuple) -> Any:
    for key in keys:
        value = value[key]
    return value


class _Eval:
    def __init__(self, scope: _Scope):
        self.scope = scope

    def pipe(self, pipe: _Pipe, dot: Any) -> Any:
        value, rest = self._command(pipe.tokens, 0, dot)
        if rest != len(pipe.tokens):
            raise GoTemplateError(
                "unsupported expression (pipelines with '|' and method calls are not implemented)"
            )
        return value

    def _command(self, toks: list, i: int, dot: Any) -> tuple[Any, int]:
        """A function call with its arguments, or a single operand."""
        kind, value = toks[i]
        if kind == "ident" and value in ("and", "or"):
            args, i = self._args(toks, i + 1, dot)
            result = args[0]
            for a in args:
                result = a
                if truth(a) != (value == "and"):
                    break
            return result, i
        if kind == "ident" and value in _FUNCS:
            args, i = self._args(toks, i + 1, dot)
            return _FUNCS[value](*args), i
        return self._operand(toks, i, dot)

    def _args(self, toks: list, i: int, dot: Any) -> tuple[list, int]:
        args = []
        while i < len(toks) and toks[i][0] != "rp":
            value, i = self._operand(toks, i, dot)
            args.append(value)
        return args, i

    def _operand(self, toks: list, i: int, dot: Any) -> tuple[Any, int]:
        kind, value = toks[i]
        if kind == "lp":
            result, i = self._command(toks, i + 1, dot)
            if i >= len(toks) or toks[i][0] != "rp":
                raise GoTemplateError("unbalanced parentheses")
            i += 1
            if i < len(toks) and toks[i][0] == "field" and toks[i][1] != ".":  # (pipeline).Field
                return _field(result, toks[i][1][1:].split(".")), i + 1
            return result, i
        if kind == "str":
            return json.loads(value), i + 1
        if kind == "raw":
            return value[1:-1], i + 1
        if kind == "num":
            return int(value), i + 1
        if kind == "field":
            return (dot if value == "." else _field(dot, value[1:].split("."))), i + 1
        if kind == "var":
            name, *path = value.split(".")
            return _field(self.scope.lookup(name), path), i + 1
        if kind == "ident" and value in ("true", "false"):
            return value == "true", i + 1
        if kind == "ident" and value == "nil":
            return None, i + 1
        raise GoTemplateError(f"unsupported function or token {value!r}")


def _print(value: Any) -> str:
    if value is None:
        return NO_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _run(nodes: list, dot: Any, ev: _Eval, out: list[str]) -> None:
    scope = ev.scope
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Pipe):
            value = ev.pipe(node, dot)
            if node.decl:
                if node.assign:
                    scope.assign(node.decl[0], value)
                else:
                    scope.stack[-1][node.decl[0]] = value
            else:
                out.append(_print(value))
        elif isinstance(node, _If):
            for cond, body in node.branches:
                if truth(ev.pipe(cond, dot)):
                    _scoped(body, dot, ev, out, {})
                    break
            else:
                if node.otherwise is not None:
                    _scoped(node.otherwise, dot, ev, out, {})
        elif isinstance(node, _Range):
            items = ev.pipe(node.pipe, dot)
            if not truth(items):
                if node.otherwise is not None:
                    _scoped(node.otherwise, dot, ev, out, {})
                continue
            pairs = items.items() if isinstance(items, dict) else enumerate(items)
            for index, item in pairs:
                names = node.pipe.decl
                frame = {names[-1]: item} if names else {}
                if len(names) == 2:
                    frame[names[0]] = index
                _scoped(node.body, item, ev, out, frame)


def _scoped(nodes: list, dot: Any, ev: _Eval, out: list[str], frame: dict) -> None:
    ev.scope.stack.append(frame)
    try:
        _run(nodes, dot, ev, out)
    finally:
        ev.scope.stack.pop()


def render(source: str, data: Any) -> str:
    """Render Go template `source` with `data` as dot (dicts for maps and structs)."""
    nodes = parse(source)
    out: list[str] = []
    _run(nodes, data, _Eval(_Scope(data)), out)
    return "".join(out)
