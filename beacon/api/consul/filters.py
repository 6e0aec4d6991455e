"""Consul's ?filter expressions (hashicorp/go-bexpr), parsed into a predicate over an answer entry (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

MAX_FILTER = 4096
_FILTER_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<op>==|!=|\(|\))"""
    r"""|(?P<word>[A-Za-z0-9_.\-]+(?:\["(?:[^"\\]|\\.)*"\][A-Za-z0-9_.\-]*)*))"""
)
Predicate = Callable[[Any], bool]
_NESTED_QUANTIFIER = re.compile(r"\([^)]*[+*}?][^)]*\)\s*[+*{]")


class FilterError(ValueError):
    """A ?filter expression Beacon cannot parse (Consul: 400)."""


def parse_filter(text: str) -> Predicate:
    """Consul's ?filter language (hashicorp/go-bexpr), the parts tools use:

    `Sel == "v"`, `Sel != "v"`, `"v" in Sel`, `"v" not in Sel`, `Sel contains "v"`,
    `Sel not contains "v"`, `Sel is empty`, `Sel is not empty`, `Sel matches "re"`,
    `Sel not matches "re"`, joined with `and`, `or`, `not` and parentheses. A selector is a
    dotted path into an answer entry (`Service.Tags`, `ServiceMeta.env`, `Node.Meta["k-1"]`);
    through a list (`Checks.Status`) it matches when any element does.
    """
    if len(text) > MAX_FILTER:
        raise FilterError(f"filter longer than {MAX_FILTER} characters")
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _FILTER_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise FilterError(f"unexpected input at position {pos}: {text[pos:pos + 20]!r}")
        tokens.append(m.group(m.lastgroup or "word"))
        pos = m.end()
    parser = _FilterParser(tokens)
    predicate = parser.expression(0)
    if parser.pos != len(tokens):
        raise FilterError(f"unexpected {tokens[parser.pos]!r}")
    return predicate


def _unquote(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    if token.startswith('"'):
        return str(json.loads(token))
    return token


def _selector_parts(token: str) -> list[str]:
    parts: list[str] = []
    for m in re.finditer(r'\["((?:[^"\\]|\\.)*)"\]|([^.\[\]]+)', token):
        parts.append(json.loads(f'"{m.group(1)}"') if m.group(1) is not None else m.group(2))
    return parts


def _resolve(value: Any, parts: list[str]) -> list[Any]:
    """Every value the selector reaches (lists fan out); a missing field reaches nothing."""
    values = [value]
    for part in parts:
        nxt: list[Any] = []
        for v in values:
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict) and part in item:
                    nxt.append(item[part])
        values = nxt
    return values


def _equal(field_value: Any, literal: str) -> bool:
    if isinstance(field_value, bool):
        return str(field_value).lower() == literal.lower()
    if isinstance(field_value, (int, float)):
        try:
            return float(field_value) == float(literal)
        except ValueError:
            return False
    return isinstance(field_value, str) and field_value == literal


def _contains(field_value: Any, literal: str) -> bool:
    if isinstance(field_value, str):
        return literal in field_value
    if isinstance(field_value, dict):
        return literal in field_value
    if isinstance(field_value, list):
        return any(_equal(item, literal) for item in field_value)
    return False


class _FilterParser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise FilterError("the expression ends too early")
        self.pos += 1
        return token

    def expect(self, word: str) -> None:
        token = self.take()
        if token.lower() != word:
            raise FilterError(f"expected {word!r}, got {token!r}")

    def expression(self, depth: int) -> Predicate:
        if depth > 32:
            raise FilterError("the expression nests too deep")
        left = self.conjunction(depth)
        while (self.peek() or "").lower() == "or":
            self.take()
            right = self.conjunction(depth)
            left = (lambda a, b: lambda v: a(v) or b(v))(left, right)
        return left

    def conjunction(self, depth: int) -> Predicate:
        left = self.unary(depth)
        while (self.peek() or "").lower() == "and":
            self.take()
            right = self.unary(depth)
            left = (lambda a, b: lambda v: a(v) and b(v))(left, right)
        return left

    def unary(self, depth: int) -> Predicate:
        token = self.peek()
        if token is not None and token.lower() == "not":
            self.take()
            inner = self.unary(depth + 1)
            return lambda v: not inner(v)
        if token == "(":
            self.take()
            inner = self.expression(depth + 1)
            if self.take() != ")":
                raise FilterError("a parenthesis is not closed")
            return inner
        return self.match()

    def match(self) -> Predicate:
        first = self.take()
        following = (self.peek() or "").lower()
        value_first = following == "in" or (following == "not" and (self.peek(1) or "").lower() == "in")
        if value_first or first.startswith(('"', "`")):
            literal = _unquote(first)
            negate = (self.peek() or "").lower() == "not"
            if negate:
                self.take()
            self.expect("in")
            parts = _selector_parts(self.take())
            return lambda v: (not negate) == any(_contains(x, literal) for x in _resolve(v, parts))
        parts = _selector_parts(first)
        op = self.take().lower()
        if op in ("==", "!="):
            literal = _unquote(self.take())
            want = op == "=="
            return lambda v: want == any(_equal(x, literal) for x in _resolve(v, parts))
        if op == "is":
            negate = (self.peek() or "").lower() == "not"
            if negate:
                self.take()
            self.expect("empty")
            return lambda v: negate != all(x in (None, "", [], {}) for x in _resolve(v, parts))
        negate = op == "not"
        if negate:
            op = self.take().lower()
        if op == "contains":
            literal = _unquote(self.take())
            return lambda v: (not negate) == any(_contains(x, literal) for x in _resolve(v, parts))
        if op == "matches":
            source = _unquote(self.take())
            if _NESTED_QUANTIFIER.search(source):
                # Python's re backtracks (Go's RE2 does not): refuse what could take exponential time.
                raise FilterError("nested quantifiers such as (a+)+ are not supported in matches")
            try:
                pattern = re.compile(source)
            except re.error as exc:
                raise FilterError(f"invalid regular expression: {exc}") from None
            return lambda v: (not negate) == any(isinstance(x, str) and pattern.search(x) is not None
                                                 for x in _resolve(v, parts))
        raise FilterError(f"unknown operator {op!r}")


def apply_filter(entries: list[Any], predicate: Predicate | None) -> list[Any]:
    return entries if predicate is None else [e for e in entries if predicate(e)]
