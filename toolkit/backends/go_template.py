"""A documented subset of Go's text/template: enough to render an Ollama Modelfile's TEMPLATE for
a chat, so validation can compare what Ollama sends the model with the reference chat template.

No maintained Python package renders Go templates (the ones on PyPI are unmaintained bindings
to a Go shared library, which a Raspberry Pi wheel would not have), and the chat templates
Ollama ships use a small part of the language. Supported:

  text, {{ pipeline }} with trim markers {{- and -}}, comments {{/* ... */}}
  .Field, .A.B, $ (the root), $.Field, $var, $var.Field, "strings", numbers, true/false
  {{ if P }} / {{ else if P }} / {{ else }} / {{ end }}, {{ range P }} / {{ range $i, $v := P }}
  (with {{ else }} for an empty list), {{ with P }}, functions eq ne and or not len, (parens)

Anything else raises TemplateError naming the action: a template this renderer does not take
fails its check with that line, never renders something else silently.
"""

from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


class TemplateError(ValueError):
    pass


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.i = tokens, 0

    def block(self) -> tuple[list, str | None]:
        """Nodes up to an {{ end }} / {{ else ... }} (returned), or the end of the template."""
        nodes: list = []
        while self.i < len(self.tokens):
            kind, body = self.tokens[self.i]
            self.i += 1
            if kind == "text":
                if body:
                    nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0] if body else ""
            if word == "end" or word == "else":
                return nodes, body
            if word in ("if", "range", "with"):
                nodes.append(self.control(word, body[len(word):].strip()))
            elif word in ("define", "template", "block", "break", "continue") or not body:
                raise TemplateError(f"unsupported action {{{{ {body} }}}}")
            else:
                nodes.append(("out", body))
        return nodes, None

    def control(self, word: str, head: str) -> tuple:
        inner, closer = self.block()
        otherwise: list = []
        if closer is not None and closer.startswith("else") and closer != "else":
            rest = closer[4:].strip()  # else if P: the else branch is an if that owns the end
            if not rest.startswith("if "):
                raise TemplateError(f"unsupported action {{{{ {closer} }}}}")
            return (word, head, inner, [self.control("if", rest[3:].strip())])
        if closer == "else":
            otherwise, closer = self.block()
        if closer != "end":
            raise TemplateError(f"{{{{ {word} {head} }}}} has no {{{{ end }}}}")
        return (word, head, inner, otherwise)


TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|[^\s()]+)')


def _split(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            break
        out.append(m.group(1))
        pos = m.end()
    return out


class _Eval:
    FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
             "not": lambda a: not _truth(a), "len": lambda a: len(a)}

    def __init__(self, root: dict):
        self.root = root

    def pipeline(self, expr: str, dot: Any, env: dict) -> Any:
        if "|" in _split(expr):
            raise TemplateError(f"pipelines with | are not supported: {{{{ {expr} }}}}")
        value, rest = self.command(_split(expr), dot, env)
        if rest:
            raise TemplateError(f"cannot read {{{{ {expr} }}}}")
        return value

    def command(self, words: list[str], dot: Any, env: dict) -> tuple[Any, list[str]]:
        """One command: a function with its arguments, or one operand; stops at ')'."""
        if not words:
            raise TemplateError("empty command")
        head = words[0]
        if head in self.FUNCS or head in ("and", "or"):
            args, rest = [], words[1:]
            while rest and rest[0] != ")":
                value, rest = self.operand(rest, dot, env)
                args.append(value)
            if head == "and":
                return next((a for a in args if not _truth(a)), args[-1] if args else None), rest
            if head == "or":
                return next((a for a in args if _truth(a)), args[-1] if args else None), rest
            return self.FUNCS[head](*args), rest
        return self.operand(words, dot, env)

    def operand(self, words: list[str], dot: Any, env: dict) -> tuple[Any, list[str]]:
        w, rest = words[0], words[1:]
        if w == "(":
            value, rest = self.command(rest, dot, env)
            if not rest or rest[0] != ")":
                raise TemplateError("unbalanced parentheses")
            return value, rest[1:]
        if w[0] in "\"`":
            return (w[1:-1] if w[0] == "`" else w[1:-1].encode().decode("unicode_escape")), rest
        if re.fullmatch(r"-?\d+", w):
            return int(w), rest
        if w in ("true", "false"):
            return w == "true", rest
        if w.startswith("."):
            return _field(dot, w[1:]), rest
        if w.startswith("$"):
            name, _, path = w.partition(".")
            base = self.root if name == "$" else env.get(name, _MISSING)
            if base is _MISSING:
                raise TemplateError(f"undefined variable {name}")
            return (_field(base, path) if path else base), rest
        raise TemplateError(f"unsupported function or operand {w!r}")


_MISSING = object()


def _field(value: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _truth(value: Any) -> bool:
    return bool(value)  # Go: false, 0, nil, empty string / list / map are false


def _run(nodes: list, ev: _Eval, dot: Any, env: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            value = ev.pipeline(node[1], dot, env)
            out.append("" if value is None else str(value))
        else:
            _, head, inner, otherwise = node
            if kind == "range":
                names, _, expr = head.rpartition(":=")
                items = ev.pipeline(expr.strip(), dot, env)
                names_ = [n.strip() for n in names.split(",") if n.strip()]
                if not items:
                    _run(otherwise, ev, dot, env, out)
                for i, item in enumerate(items or []):
                    scope = dict(env)
                    if len(names_) == 2:
                        scope[names_[0]], scope[names_[1]] = i, item
                    elif names_:
                        scope[names_[0]] = item
                    _run(inner, ev, item, scope, out)
                continue
            value = ev.pipeline(head, dot, env)
            branch = inner if _truth(value) else otherwise
            _run(branch, ev, value if kind == "with" and _truth(value) else dot, env, out)


def render(template: str, data: dict) -> str:
    """The template rendered with `data` as its root (.Messages, .System, ...)."""
    nodes, closer = _Parser(_lex(template)).block()
    if closer is not None:
        raise TemplateError(f"{{{{ {closer} }}}} without an opening action")
    out: list[str] = []
    _run(nodes, _Eval(data), data, {}, out)
    return "".join(out)
