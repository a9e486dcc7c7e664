"""A Common Expression Language (CEL) evaluator for the expressions upstream's plugins take
(``request-attribute-reporter``).

Supported: int (64-bit, overflow is an error), uint (``1u``), double, bool, string (all of
CEL's quoting: ``'…'``, ``"…"``, triple quotes, raw ``r"…"``, escapes), bytes (``b"…"``),
``null``, lists, maps, type values; the operators ``?:``, ``||``, ``&&`` (both commutative:
an error on one side is absorbed when the other decides), ``!``, ``-``, ``*``, ``/``, ``%``,
``+``, comparisons (numbers compare across int, uint and double) and ``in``; field selection
and indexing; the macros ``has``, ``all``, ``exists``, ``exists_one``, ``map``, ``filter``; the
functions ``size``, ``int``, ``uint``, ``double``, ``string``, ``bytes``, ``bool``, ``dyn``,
``type``, ``contains``, ``startsWith``, ``endsWith``. Not supported: ``matches`` (CEL's
regular expressions are RE2's, linear in time; Python's are not, and a backtracking pattern
could stall the caller), protocol buffer messages, timestamps and durations.

As in CEL, arithmetic never mixes numeric types (``2.0 + 1`` has no overload: an error), so
an expression over JSON data (whose numbers are all doubles) adds doubles to doubles.
Compilation rejects syntax errors, unknown identifiers and functions, and operands whose types
are known to have no overload; what only the data can decide (a missing key, a double added to
an int, a division by zero) is an error at evaluation (`CelError`).

Bounds: an expression has at most `MAX_EXPRESSION_CHARS` characters and nests at most
`MAX_DEPTH` deep; one evaluation spends at most `MAX_STEPS` steps (a step per node visited,
macro iterations included, one per element scanned by ``in``, ``==`` or a lookup, one per
element or 16 characters a concatenation builds) and builds no string, bytes, list or map
larger than `MAX_VALUE_SIZE` (characters or elements), so a program's time and memory are
bounded whatever its input.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPRESSION_CHARS",
    "MAX_STEPS",
    "MAX_VALUE_SIZE",
    "CelError",
    "CelProgram",
    "CelSyntaxError",
    "CelType",
    "UInt",
    "compile_cel",
    "short",
]

#: Longest expression accepted, in characters.
MAX_EXPRESSION_CHARS: Final = 8192
#: Deepest nesting of sub-expressions accepted.
MAX_DEPTH: Final = 64
#: Most nodes one evaluation visits.
MAX_STEPS: Final = 100_000
#: Largest string, bytes, list or map one evaluation builds.
MAX_VALUE_SIZE: Final = 100_000

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_UINT_MAX: Final = 2**64 - 1


class CelSyntaxError(ValueError):
    """The expression does not compile (syntax, unknown names, impossible operand types)."""


class CelError(ValueError):
    """The expression failed on this input (no such key, no matching overload, overflow...)."""


class UInt(int):
    """A CEL ``uint`` value (a Python int marked unsigned)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{int(self)}u"


@dataclass(frozen=True)
class CelType:
    """A CEL type value (what ``type(x)`` returns and ``int``, ``string``... name)."""

    name: str

    def __repr__(self) -> str:
        return self.name


_TYPES: Final = {
    n: CelType(n)
    for n in (
        "int",
        "uint",
        "double",
        "bool",
        "string",
        "bytes",
        "list",
        "map",
        "null_type",
        "type",
    )
}


#: Python type -> CEL type name, in the order to test (bool before int, uint before int).
_TYPE_OF: Final[tuple[tuple[Any, str], ...]] = (
    (bool, "bool"),
    (UInt, "uint"),
    (int, "int"),
    (float, "double"),
    (str, "string"),
    (bytes, "bytes"),
    (list | tuple, "list"),
    (Mapping, "map"),
    (CelType, "type"),
)


def _type_name(v: Any) -> str:
    if v is None:
        return "null_type"
    for python_type, name in _TYPE_OF:
        if isinstance(v, python_type):
            return name
    raise CelError(f"unsupported value of Python type {type(v).__name__}")


# -- lexing -------------------------------------------------------------------------------------

_RESERVED: Final = frozenset(
    {
        "as", "break", "const", "continue", "else", "for", "function", "if", "import", "let",
        "loop", "package", "namespace", "return", "var", "void", "while",
    }
)  # fmt: skip
_TOKEN: Final = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<num>0x[0-9a-fA-F]+[uU]?|\d+[uU]|(?:\d+\.\d+|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>[rRbB]{0,2}(?:'''|\"\"\"|'|\"))
  | (?P<id>[_a-zA-Z][_a-zA-Z0-9]*)
  | (?P<op>\|\||&&|==|!=|<=|>=|[-+*/%!<>?:.,()\[\]{}])
    """,
    re.VERBOSE | re.ASCII,
)
_SIMPLE_ESCAPES: Final = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", "'": "'", '"': '"', "`": "`", "?": "?",
}  # fmt: skip


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, str, id, op, end
    text: str
    pos: int
    value: Any = None


def _string_literal(src: str, start: int, prefix: str, quote: str) -> tuple[Any, int]:
    """The value of the string literal whose opening quote ends at `start`, and where it ends.

    In bytes literals ``\\x`` and octal escapes are single bytes and other text is UTF-8; in
    strings they are code points."""
    raw = "r" in prefix.lower()
    is_bytes = "b" in prefix.lower()
    out: list[str | int] = []  # text, or one byte of a bytes literal
    i, n = start, len(src)
    while True:
        if i >= n:
            raise CelSyntaxError(f"unterminated string literal at {start - len(quote)}")
        if src.startswith(quote, i):
            i += len(quote)
            break
        c = src[i]
        if c == "\n" and len(quote) == 1:
            raise CelSyntaxError(f"line break in a string literal at {i}")
        if c != "\\" or raw:
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise CelSyntaxError(f"unterminated escape at {i}")
        e = src[i + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e in "xXuU":
            width = {"x": 2, "X": 2, "u": 4, "U": 8}[e]
            digits = src[i + 2 : i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise CelSyntaxError(f"bad \\{e} escape at {i}")
            code = int(digits, 16)
            if (e in "uU" and is_bytes) or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise CelSyntaxError(f"bad \\{e} escape at {i}")
            out.append(code if is_bytes else chr(code))
            i += 2 + width
        elif e in "0123":
            digits = src[i + 1 : i + 4]
            if len(digits) != 3 or not all(d in "01234567" for d in digits):
                raise CelSyntaxError(f"bad octal escape at {i}")
            code = int(digits, 8)
            out.append(code if is_bytes else chr(code))
            i += 4
        else:
            raise CelSyntaxError(f"unknown escape \\{e} at {i}")
    if not is_bytes:
        return "".join(str(x) for x in out), i
    data = bytearray()
    try:
        for x in out:
            if isinstance(x, int):
                data.append(x)
            else:
                data.extend(x.encode("utf-8"))
    except UnicodeEncodeError:
        raise CelSyntaxError(f"bytes literal with an unpaired surrogate at {start}") from None
    return bytes(data), i


#: Longest integer literal read (digits; 2**64 has 20).
_MAX_DIGITS: Final = 24


def _number(text: str, pos: int) -> Any:
    t = text.lower()
    if len(t) > _MAX_DIGITS + 3 and not any(c in t for c in ".e"):
        raise CelSyntaxError(f"int literal out of range at {pos}")
    if t.startswith("0x"):
        unsigned = t.endswith("u")
        value = int(t[2:].rstrip("u"), 16)
    elif t.endswith("u"):
        unsigned = True
        value = int(t[:-1])
    elif any(c in t for c in ".e"):
        value_f = float(t)
        if math.isinf(value_f):
            raise CelSyntaxError(f"invalid double literal at {pos}")
        return value_f
    else:
        unsigned = False
        value = int(t)
    if unsigned:
        if value > _UINT_MAX:
            raise CelSyntaxError(f"uint literal out of range at {pos}")
        return UInt(value)
    if value > _INT_MAX + 1:  # 2**63 is allowed only right after a minus sign (checked later)
        raise CelSyntaxError(f"int literal out of range at {pos}")
    return value


def _lex(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(src)
    while i < n:
        m = _TOKEN.match(src, i)
        if m is None:
            raise CelSyntaxError(f"unexpected character {src[i]!r} at {i}")
        kind = m.lastgroup
        assert kind is not None
        text = m.group(kind)
        if kind == "ws":
            i = m.end()
        elif kind == "str":
            quote = text.lstrip("rRbB")
            prefix = text[: len(text) - len(quote)]
            if len(prefix) == 2 and prefix.lower() not in ("rb", "br"):
                raise CelSyntaxError(f"bad string prefix {prefix!r} at {i}")
            value, end = _string_literal(src, m.end(), prefix, quote)
            toks.append(_Tok("str", src[i:end], i, value))
            i = end
        elif kind == "num":
            end = m.end()
            if end < n and (src[end].isalnum() or src[end] == "_"):
                raise CelSyntaxError(f"bad number at {i}")
            toks.append(_Tok("num", text, i, _number(text, i)))
            i = end
        else:
            toks.append(_Tok(kind, text, i))
            i = m.end()
    toks.append(_Tok("end", "", n))
    return toks


# -- parsing ------------------------------------------------------------------------------------
#
# Nodes are tuples: ("lit", value) ("id", name) ("sel", operand, field) ("has", operand, field)
# ("idx", operand, index) ("call", name, target|None, args) ("list", items) ("map", pairs)
# ("and", a, b) ("or", a, b) ("not", a) ("neg", a) ("cond", c, a, b) ("op", sym, a, b)
# ("comp", macro, range, var, var2|None, pred|None, expr|None)

Node = tuple[Any, ...]
_RELATIONS: Final = ("<", "<=", ">", ">=", "==", "!=", "in")
_MACROS: Final = {"all": (2,), "exists": (2,), "exists_one": (2,), "map": (2, 3), "filter": (2,)}


class _Parser:
    def __init__(self, src: str) -> None:
        self.toks = _lex(src)
        self.i = 0
        self.depth = 0

    def peek(self, text: str) -> bool:
        t = self.toks[self.i]
        return t.kind in ("op", "id") and t.text == text

    def take(self, text: str) -> _Tok:
        t = self.toks[self.i]
        if not (t.kind in ("op", "id") and t.text == text):
            found = t.text or "the end"
            raise CelSyntaxError(f"expected {text!r} at {t.pos}, found {found!r}")
        self.i += 1
        return t

    def parse(self) -> Node:
        node = self.expr()
        t = self.toks[self.i]
        if t.kind != "end":
            raise CelSyntaxError(f"unexpected {t.text!r} at {t.pos}")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CelSyntaxError(f"expression nests deeper than {MAX_DEPTH}")
        try:
            node = self.or_()
            if self.peek("?"):
                self.i += 1
                a = self.or_()
                self.take(":")
                b = self.expr()
                node = ("cond", node, a, b)
            return node
        finally:
            self.depth -= 1

    def _chain(self, operand: Callable[[], Node], ops: tuple[str, ...], kind: str) -> Node:
        """A left-associative run of `operand`s joined by `ops`: ``(kind, a, b)`` nodes for the
        logical operators, ``("op", symbol, a, b)`` for the others."""
        node = operand()
        while True:
            t = self.toks[self.i]
            if t.kind not in ("op", "id") or t.text not in ops:
                return node
            self.i += 1
            rhs = operand()
            node = (kind, node, rhs) if kind != "op" else ("op", t.text, node, rhs)

    def or_(self) -> Node:
        return self._chain(self.and_, ("||",), "or")

    def and_(self) -> Node:
        return self._chain(self.relation, ("&&",), "and")

    def relation(self) -> Node:
        return self._chain(self.addition, _RELATIONS, "op")

    def addition(self) -> Node:
        return self._chain(self.multiplication, ("+", "-"), "op")

    def multiplication(self) -> Node:
        return self._chain(self.unary, ("*", "/", "%"), "op")

    def unary(self) -> Node:
        if self.peek("!"):
            self.i += 1
            return self._nest(lambda: ("not", self.unary()))
        if self.peek("-"):
            self.i += 1
            t = self.toks[self.i]
            if t.kind == "num" and type(t.value) is int:
                # NOTE: a negative literal (so -9223372036854775808 is an int).
                self.i += 1
                return self.member(("lit", -t.value))
            return self._nest(lambda: ("neg", self.unary()))
        return self.member(self.primary())

    def _nest(self, build: Callable[[], Node]) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CelSyntaxError(f"expression nests deeper than {MAX_DEPTH}")
        try:
            return build()
        finally:
            self.depth -= 1

    def member(self, node: Node) -> Node:
        while True:
            if self.peek("."):
                self.i += 1
                t = self.toks[self.i]
                if t.kind != "id":
                    raise CelSyntaxError(f"expected a field name at {t.pos}")
                self.i += 1
                if self.peek("("):
                    node = self.call(t.text, node, t.pos)
                else:
                    node = ("sel", node, t.text)
            elif self.peek("["):
                self.i += 1
                index = self.expr()
                self.take("]")
                node = ("idx", node, index)
            else:
                return node

    def args(self) -> list[Node]:
        self.take("(")
        out: list[Node] = []
        if not self.peek(")"):
            out.append(self.expr())
            while self.peek(","):
                self.i += 1
                out.append(self.expr())
        self.take(")")
        return out

    def call(self, name: str, target: Node | None, pos: int) -> Node:
        args = self.args()
        if target is None and name == "has":
            if len(args) != 1 or args[0][0] != "sel":
                raise CelSyntaxError(f"has() takes one field selection, as has(a.b), at {pos}")
            return ("has", args[0][1], args[0][2])
        if target is not None and name in _MACROS:
            if len(args) not in _MACROS[name]:
                raise CelSyntaxError(f"{name}() takes {' or '.join(map(str, _MACROS[name]))} args")
            if args[0][0] != "id":
                raise CelSyntaxError(f"{name}()'s first argument must be a variable name")
            var = args[0][1]
            if name == "map":
                pred, body = (args[1], args[2]) if len(args) == 3 else (None, args[1])
                return ("comp", name, target, var, pred, body)
            return ("comp", name, target, var, args[1], None)
        return ("call", name, target, args)

    def primary(self) -> Node:
        t = self.toks[self.i]
        if t.kind in ("num", "str"):
            self.i += 1
            if type(t.value) is int and t.value > _INT_MAX:
                raise CelSyntaxError(f"int literal out of range at {t.pos}")
            return ("lit", t.value)
        if t.kind == "id":
            self.i += 1
            if t.text in _RESERVED:
                raise CelSyntaxError(f"reserved word {t.text!r} at {t.pos}")
            if t.text in ("true", "false"):
                return ("lit", t.text == "true")
            if t.text == "null":
                return ("lit", None)
            if self.peek("("):
                return self.call(t.text, None, t.pos)
            return ("id", t.text)
        if t.kind == "op" and t.text == ".":
            self.i += 1  # a leading dot names the root scope: .usage is usage
            nxt = self.toks[self.i]
            if nxt.kind != "id":
                raise CelSyntaxError(f"expected a name at {nxt.pos}")
            return self.primary()
        if self.peek("("):
            self.i += 1
            node = self.expr()
            self.take(")")
            return node
        if self.peek("["):
            self.i += 1
            items: list[Node] = []
            while not self.peek("]"):
                items.append(self.expr())
                if not self.peek(","):
                    break
                self.i += 1
            self.take("]")
            return ("list", items)
        if self.peek("{"):
            self.i += 1
            pairs: list[tuple[Node, Node]] = []
            while not self.peek("}"):
                k = self.expr()
                self.take(":")
                pairs.append((k, self.expr()))
                if not self.peek(","):
                    break
                self.i += 1
            self.take("}")
            return ("map", pairs)
        raise CelSyntaxError(f"unexpected {t.text or 'end of expression'!r} at {t.pos}")


# -- checking -----------------------------------------------------------------------------------

_FUNCTIONS: Final = {
    # name: (global arities, receiver arities (not counting the receiver))
    "size": ((1,), (0,)),
    "int": ((1,), ()),
    "uint": ((1,), ()),
    "double": ((1,), ()),
    "string": ((1,), ()),
    "bytes": ((1,), ()),
    "bool": ((1,), ()),
    "dyn": ((1,), ()),
    "type": ((1,), ()),
    "contains": ((), (1,)),
    "startsWith": ((), (1,)),
    "endsWith": ((), (1,)),
}
_NUMERIC: Final = frozenset(("int", "uint", "double"))
_ARITH: Final = {
    "+": frozenset(("int", "uint", "double", "string", "bytes", "list")),
    "-": _NUMERIC,
    "*": _NUMERIC,
    "/": _NUMERIC,
    "%": frozenset(("int", "uint")),
}
_ORDERED: Final = frozenset(("int", "uint", "double", "string", "bytes", "bool"))


def _static_type(node: Node, scope: frozenset[str], variables: frozenset[str]) -> str:
    """The node's type when the expression alone decides it, else ``dyn``; raises
    CelSyntaxError on unknown names and functions and on operands with no overload."""
    kind = node[0]
    if kind == "lit":
        return _type_name(node[1])
    if kind == "id":
        name = node[1]
        if name in scope or name in variables:
            return "dyn"
        if name in _TYPES:
            return "type"
        raise CelSyntaxError(f"undeclared reference to {name!r} (declared: {sorted(variables)})")
    if kind in ("sel", "has"):
        t = _static_type(node[1], scope, variables)
        if t not in ("dyn", "map"):
            raise CelSyntaxError(f"type {t} has no field {node[2]!r}")
        return "bool" if kind == "has" else "dyn"
    if kind == "idx":
        _static_type(node[1], scope, variables)
        _static_type(node[2], scope, variables)
        return "dyn"
    if kind == "list":
        for item in node[1]:
            _static_type(item, scope, variables)
        return "list"
    if kind == "map":
        for k, v in node[1]:
            _static_type(k, scope, variables)
            _static_type(v, scope, variables)
        return "map"
    if kind in ("and", "or"):
        for side in node[1:]:
            t = _static_type(side, scope, variables)
            if t not in ("bool", "dyn"):
                raise CelSyntaxError(f"'{'&&' if kind == 'and' else '||'}' applied to {t}")
        return "bool"
    if kind == "not":
        t = _static_type(node[1], scope, variables)
        if t not in ("bool", "dyn"):
            raise CelSyntaxError(f"'!' applied to {t}")
        return "bool"
    if kind == "neg":
        t = _static_type(node[1], scope, variables)
        if t not in ("int", "double", "dyn"):
            raise CelSyntaxError(f"'-' applied to {t}")
        return t
    if kind == "cond":
        c = _static_type(node[1], scope, variables)
        if c not in ("bool", "dyn"):
            raise CelSyntaxError(f"'?:' condition is {c}, not bool")
        a = _static_type(node[2], scope, variables)
        b = _static_type(node[3], scope, variables)
        if "dyn" not in (a, b) and a != b:
            raise CelSyntaxError(f"'?:' branches of different types ({a}, {b})")
        return a if a == b else "dyn"
    if kind == "op":
        sym = node[1]
        a = _static_type(node[2], scope, variables)
        b = _static_type(node[3], scope, variables)
        known = a != "dyn" and b != "dyn"
        if sym in _ARITH:
            if known and (a != b or a not in _ARITH[sym]):
                raise CelSyntaxError(f"no overload of '{sym}' for ({a}, {b})")
            return a if a != "dyn" else b
        if sym in ("<", "<=", ">", ">="):
            ok = (a in _NUMERIC and b in _NUMERIC) or (a == b and a in _ORDERED)
            if known and not ok:
                raise CelSyntaxError(f"no overload of '{sym}' for ({a}, {b})")
        if sym in ("==", "!=") and known and a != b:
            raise CelSyntaxError(f"no overload of '{sym}' for ({a}, {b})")
        if sym == "in" and b not in ("list", "map", "dyn"):
            raise CelSyntaxError(f"'in' needs a list or map, not {b}")
        return "bool"
    if kind == "comp":
        _, macro, rng, var, pred, body = node
        _static_type(rng, scope, variables)
        inner = scope | {var}
        if pred is not None:
            t = _static_type(pred, inner, variables)
            if t not in ("bool", "dyn"):
                raise CelSyntaxError(f"{macro}() predicate is {t}, not bool")
        if body is not None:
            _static_type(body, inner, variables)
        return "list" if macro in ("map", "filter") else "bool"
    if kind == "call":
        _, name, target, args = node
        spec = _FUNCTIONS.get(name)
        arities = None if spec is None else spec[0] if target is None else spec[1]
        if not arities or len(args) not in arities:
            how = "function" if target is None else "method"
            raise CelSyntaxError(f"unknown {how} {name}() with {len(args)} argument(s)")
        if target is not None:
            _static_type(target, scope, variables)
        for arg in args:
            _static_type(arg, scope, variables)
        if name in ("int", "uint", "double", "string", "bytes", "bool", "type"):
            return str(name)
        if name == "size":
            return "int"
        if name in ("contains", "startsWith", "endsWith"):
            return "bool"
        return "dyn"
    raise AssertionError(kind)


# -- evaluation ---------------------------------------------------------------------------------


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40


def short(v: Any) -> str:
    """A value for a message: bounded in length whatever its size or nesting."""
    return _SHORT.repr(v)


def _int(v: int) -> int:
    if not _INT_MIN <= v <= _INT_MAX:
        raise CelError("int overflow")
    return v


def _uint(v: int) -> UInt:
    if not 0 <= v <= _UINT_MAX:
        raise CelError("uint overflow")
    return UInt(v)


def _sized(v: Any) -> Any:
    if len(v) > MAX_VALUE_SIZE:
        raise CelError(f"value larger than {MAX_VALUE_SIZE}")
    return v


def _numeric_kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return _type_name(v)
    return None


def _equal(a: Any, b: Any, charge: Callable[[int], None]) -> bool:
    """CEL equality (numbers compare by value across types; lists and maps element-wise),
    charging a step per element compared."""
    charge(1)
    ka, kb = _numeric_kind(a), _numeric_kind(b)
    if ka and kb:
        return bool(a == b)  # Python compares int and float by exact value, as CEL
    ta, tb = _type_name(a), _type_name(b)
    if ta != tb:
        return False
    if ta == "list":
        return len(a) == len(b) and all(_equal(x, y, charge) for x, y in zip(a, b, strict=True))
    if ta == "map":
        if len(a) != len(b):
            return False
        for k, v in a.items():
            other = b.get(k, _MISSING)
            if other is _MISSING or not _equal(v, other, charge):
                return False
        return True
    if ta in ("string", "bytes"):
        charge(len(a) // 64)
    return bool(a == b)


_MISSING: Final = object()


@dataclass(frozen=True)
class _BoolKey:
    """A bool map key (Python's True == 1 would otherwise collide with the int key 1)."""

    value: bool


def _key(key: Any) -> Any:
    """`key` as a Python dict key: numeric keys match across int, uint and double by value (as
    Python's dicts do), bools never match numbers."""
    if isinstance(key, bool):
        return _BoolKey(key)
    if isinstance(key, str | int | float | _BoolKey):
        return key
    raise CelError(f"unsupported map key type {_type_name(key)}")


def _unkey(key: Any) -> Any:
    return key.value if isinstance(key, _BoolKey) else key


def _lookup(m: Mapping[Any, Any], key: Any) -> Any:
    """`m`'s value at `key`, or _MISSING."""
    return m.get(_key(key), _MISSING)


def _compare(a: Any, b: Any, sym: str) -> bool:
    ta, tb = _type_name(a), _type_name(b)
    if not ((ta in _NUMERIC and tb in _NUMERIC) or (ta == tb and ta in _ORDERED)):
        raise CelError(f"no such overload: {ta} {sym} {tb}")
    if (ta == "double" and math.isnan(a)) or (tb == "double" and math.isnan(b)):
        return False
    if sym == "<":
        return bool(a < b)
    if sym == "<=":
        return bool(a <= b)
    if sym == ">":
        return bool(a > b)
    return bool(a >= b)


def _arith(sym: str, a: Any, b: Any) -> Any:
    ta, tb = _type_name(a), _type_name(b)
    if ta != tb or ta not in _ARITH[sym]:
        raise CelError(f"no such overload: {ta} {sym} {tb}")
    if ta == "double":
        if sym == "+":
            return a + b
        if sym == "-":
            return a - b
        if sym == "*":
            return a * b
        if b == 0.0:  # IEEE 754, as CEL: x/0 is +-inf, 0/0 is NaN
            return (
                math.nan
                if a == 0.0 or math.isnan(a)
                else math.copysign(math.inf, a) * (math.copysign(1.0, b))
            )
        return a / b
    if ta in ("int", "uint"):
        wrap = _int if ta == "int" else _uint
        if sym == "+":
            return wrap(int(a) + int(b))
        if sym == "-":
            return wrap(int(a) - int(b))
        if sym == "*":
            return wrap(int(a) * int(b))
        if b == 0:
            raise CelError("division by zero" if sym == "/" else "modulus by zero")
        q = abs(int(a)) // abs(int(b))
        if (a < 0) != (b < 0):
            q = -q  # truncated toward zero
        if sym == "%":
            wrap(q)  # MIN % -1 overflows as MIN / -1 does
            return wrap(int(a) - int(b) * q)
        return wrap(q)
    if ta == "list":
        return _sized([*a, *b])
    return _sized(a + b)


_INT_TEXT: Final = re.compile(r"[+-]?[0-9]{1,24}", re.ASCII)
_UINT_TEXT: Final = re.compile(r"\+?[0-9]{1,24}", re.ASCII)
_DOUBLE_TEXT: Final = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
    re.ASCII | re.IGNORECASE,
)


def _convert(name: str, v: Any) -> Any:
    t = _type_name(v)
    try:
        if name == "int":
            if t in ("int", "uint"):
                return _int(int(v))
            if t == "double":
                # NOTE: the open interval (min int, max int), as CEL's range check.
                if not -(2.0**63) < v < 2.0**63:
                    raise CelError("int overflow" if math.isfinite(v) else "int() of non-finite")
                return _int(int(v))
            if t == "string":
                if not _INT_TEXT.fullmatch(v):
                    raise CelError(f"int() cannot read {short(v)}")
                return _int(int(v, 10))
        elif name == "uint":
            if t in ("int", "uint"):
                return _uint(int(v))
            if t == "double":
                if not 0.0 <= v < 2.0**64:
                    raise CelError("uint overflow" if math.isfinite(v) else "uint() of non-finite")
                return _uint(int(v))
            if t == "string":
                if not _UINT_TEXT.fullmatch(v):
                    raise CelError(f"uint() cannot read {short(v)}")
                return _uint(int(v, 10))
        elif name == "double":
            if t in ("int", "uint", "double"):
                return float(v)
            if t == "string":
                if not _DOUBLE_TEXT.fullmatch(v):
                    raise CelError(f"double() cannot read {short(v)}")
                out = float(v)
                if math.isinf(out) and "inf" not in v.lower():
                    raise CelError("double() out of range")
                return out
        elif name == "string":
            if t == "string":
                return v
            if t in ("int", "uint"):
                return str(int(v))
            if t == "double":
                return repr(v) if not v.is_integer() or abs(v) >= 1e21 else str(int(v))
            if t == "bool":
                return "true" if v else "false"
            if t == "bytes":
                return v.decode("utf-8")
            if t == "type":
                return v.name
        elif name == "bytes":
            if t == "bytes":
                return v
            if t == "string":
                return v.encode("utf-8")
        elif name == "bool":
            if t == "bool":
                return v
            if t == "string":
                if v in ("true", "True", "TRUE", "t", "1"):
                    return True
                if v in ("false", "False", "FALSE", "f", "0"):
                    return False
                raise CelError(f"bool() cannot read {short(v)}")
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        if isinstance(exc, CelError):
            raise
        raise CelError(f"{name}() cannot convert this {t}") from None
    raise CelError(f"no such overload: {name}({t})")


class _Eval:
    def __init__(self, variables: Mapping[str, Any]) -> None:
        self.vars: dict[str, Any] = dict(variables)
        self.steps = 0

    def charge(self, n: int) -> None:
        """Count `n` steps of work (a node, or a scan over a collection's elements)."""
        self.steps += n
        if self.steps > MAX_STEPS:
            raise CelError(f"evaluation took more than {MAX_STEPS} steps")

    def run(self, node: Node) -> Any:
        self.charge(1)
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "id":
            name = node[1]
            if name in self.vars:
                return self.vars[name]
            if name in _TYPES:
                return _TYPES[name]
            raise CelError(f"no value for {name!r}")
        if kind == "sel":
            obj = self.run(node[1])
            if not isinstance(obj, Mapping):
                raise CelError(f"type {_type_name(obj)} has no field {node[2]!r}")
            value = _lookup(obj, node[2])
            if value is _MISSING:
                raise CelError(f"no such key: {node[2]!r}")
            return value
        if kind == "has":
            obj = self.run(node[1])
            if not isinstance(obj, Mapping):
                raise CelError(f"has() of a field of type {_type_name(obj)}")
            return _lookup(obj, node[2]) is not _MISSING
        if kind == "idx":
            obj, index = self.run(node[1]), self.run(node[2])
            if isinstance(obj, Mapping):
                value = _lookup(obj, index)
                if value is _MISSING:
                    raise CelError(f"no such key: {short(index)}")
                return value
            if isinstance(obj, list | tuple):
                if _numeric_kind(index) is None or (
                    isinstance(index, float) and not index.is_integer()
                ):
                    raise CelError(f"list index of type {_type_name(index)}")
                i = int(index)
                if not 0 <= i < len(obj):
                    raise CelError(f"index {i} out of range [0, {len(obj)})")
                return obj[i]
            raise CelError(f"type {_type_name(obj)} cannot be indexed")
        if kind == "list":
            return _sized([self.run(item) for item in node[1]])
        if kind == "map":
            out: dict[Any, Any] = {}
            for k_node, v_node in node[1]:
                k = self.run(k_node)
                if _type_name(k) not in ("int", "uint", "bool", "string"):
                    raise CelError(f"map key of type {_type_name(k)}")
                if _lookup(out, k) is not _MISSING:
                    raise CelError(f"repeated map key {short(k)}")
                out[_key(k)] = self.run(v_node)
            return _sized(out)
        if kind in ("and", "or"):
            decisive = kind == "or"  # the value that decides alone
            error: CelError | None = None
            for side in node[1:]:
                try:
                    v = self.run(side)
                except CelError as exc:
                    error = exc
                    continue
                if not isinstance(v, bool):
                    error = CelError(f"no such overload: {_type_name(v)} in a logical operator")
                elif v is decisive:
                    return decisive
            if error is not None:
                raise error
            return not decisive
        if kind == "not":
            v = self.run(node[1])
            if not isinstance(v, bool):
                raise CelError(f"no such overload: !{_type_name(v)}")
            return not v
        if kind == "neg":
            v = self.run(node[1])
            t = _type_name(v)
            if t == "int":
                return _int(-v)
            if t == "double":
                return -v
            raise CelError(f"no such overload: -{t}")
        if kind == "cond":
            c = self.run(node[1])
            if not isinstance(c, bool):
                raise CelError(f"?: condition of type {_type_name(c)}")
            return self.run(node[2] if c else node[3])
        if kind == "op":
            return self.op(node[1], self.run(node[2]), self.run(node[3]))
        if kind == "comp":
            return self.comprehension(node)
        return self.call(node)

    def op(self, sym: str, a: Any, b: Any) -> Any:
        for v in (a, b):
            if isinstance(v, list | tuple | Mapping | str | bytes):
                self.charge(len(v) // (64 if isinstance(v, str | bytes) else 1))
        if sym == "==":
            return _equal(a, b, self.charge)
        if sym == "!=":
            return not _equal(a, b, self.charge)
        if sym == "in":
            if isinstance(b, Mapping):
                return _lookup(b, a) is not _MISSING
            if isinstance(b, list | tuple):
                return any(_equal(a, x, self.charge) for x in b)
            raise CelError(f"no such overload: {_type_name(a)} in {_type_name(b)}")
        if sym in _ARITH:
            out = _arith(sym, a, b)
            if isinstance(out, str | bytes):
                self.charge(len(out) // 16)  # what concatenations build is paid for
            elif isinstance(out, list):
                self.charge(len(out))
            return out
        return _compare(a, b, sym)

    def comprehension(self, node: Node) -> Any:
        _, macro, rng_node, var, pred, body = node
        rng = self.run(rng_node)
        if isinstance(rng, Mapping):
            items = [_unkey(k) for k in rng]
        elif isinstance(rng, list | tuple):
            items = list(rng)
        else:
            raise CelError(f"{macro}() over a {_type_name(rng)}")
        saved = self.vars.get(var, _MISSING)
        try:
            return self._iterate(macro, items, var, pred, body)
        finally:
            if saved is _MISSING:
                self.vars.pop(var, None)
            else:
                self.vars[var] = saved

    def _iterate(self, macro: str, items: list[Any], var: str, pred: Any, body: Any) -> Any:
        def test(item: Any) -> bool:
            self.vars[var] = item
            v = self.run(pred)
            if not isinstance(v, bool):
                raise CelError(f"{macro}() predicate of type {_type_name(v)}")
            return v

        if macro in ("all", "exists"):
            decisive = macro == "exists"
            error: CelError | None = None
            for item in items:
                try:
                    if test(item) is decisive:
                        return decisive
                except CelError as exc:
                    error = exc
            if error is not None:
                raise error
            return not decisive
        if macro == "exists_one":
            return sum(1 for item in items if test(item)) == 1
        out: list[Any] = []
        for item in items:
            if pred is None or test(item):
                if macro == "filter":
                    out.append(item)
                else:
                    self.vars[var] = item
                    out.append(self.run(body))
        return _sized(out)

    def call(self, node: Node) -> Any:
        _, name, target_node, arg_nodes = node
        args = [self.run(a) for a in arg_nodes]
        if target_node is not None:
            args.insert(0, self.run(target_node))
        if name == "dyn":
            return args[0]
        if name == "type":
            return _TYPES[_type_name(args[0])]
        if name == "size":
            v = args[0]
            if isinstance(v, str | bytes | list | tuple | Mapping):
                return len(v)
            raise CelError(f"no such overload: size({_type_name(v)})")
        if name in ("int", "uint", "double", "string", "bytes", "bool"):
            out = _convert(name, args[0])
            if isinstance(out, str | bytes):
                self.charge(len(out) // 16)  # a conversion's copy is paid for as + is
                _sized(out)
            return out
        s, arg = args
        if not isinstance(s, str) or not isinstance(arg, str):
            raise CelError(f"no such overload: {name}({_type_name(s)}, {_type_name(arg)})")
        self.charge(len(s) // 64)
        if name == "contains":
            return arg in s
        if name == "startsWith":
            return s.startswith(arg)
        return s.endswith(arg)


# -- programs -----------------------------------------------------------------------------------


class CelProgram:
    """A compiled expression (`compile_cel`); `evaluate` runs it on values of its variables."""

    __slots__ = ("_ast", "source", "variables")

    def __init__(self, source: str, ast: Node, variables: frozenset[str]) -> None:
        self.source = source
        self._ast = ast
        self.variables = variables

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """The expression's value with `variables` bound (JSON-like values: dicts, lists,
        str, int, float, bool, None; `UInt` for uint).

        Raises:
            CelError: The evaluation failed (no such key, no matching overload, overflow,
                division by zero, a bound exceeded).
        """
        try:
            return _Eval(variables).run(self._ast)
        except RecursionError:
            raise CelError("evaluation nested too deeply") from None

    def __repr__(self) -> str:
        return f"CelProgram({self.source!r})"


def _depth(ast: Node) -> int:
    """How deep `ast` nests (counted without recursion: a long chain such as ``a + a + ...``
    is as deep as it is long)."""
    deepest = 0
    todo: list[tuple[Node, int]] = [(ast, 1)]
    while todo:
        node, d = todo.pop()
        deepest = max(deepest, d)
        if node[0] == "lit":
            continue
        for part in node[1:]:
            if _is_node(part):
                todo.append((part, d + 1))
            elif isinstance(part, list):  # list items, call arguments, map (key, value) pairs
                for item in part:
                    if _is_node(item):
                        todo.append((item, d + 1))
                    elif isinstance(item, tuple):
                        todo.extend((sub, d + 1) for sub in item if _is_node(sub))
    return deepest


def _is_node(x: Any) -> bool:
    return isinstance(x, tuple) and bool(x) and isinstance(x[0], str)


def compile_cel(source: str, variables: frozenset[str] | set[str]) -> CelProgram:
    """Compile `source` with `variables` declared (each of dynamic type).

    Raises:
        CelSyntaxError: The expression is empty, too long or too deep, does not parse, names an
            undeclared variable or unknown function, or applies an operator to operands it has
            no overload for.
    """
    if not source.strip():
        raise CelSyntaxError("empty expression")
    if len(source) > MAX_EXPRESSION_CHARS:
        raise CelSyntaxError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    names = frozenset(variables)
    try:
        ast = _Parser(source).parse()
        if _depth(ast) > MAX_DEPTH:
            raise CelSyntaxError(f"expression nests deeper than {MAX_DEPTH}")
        _static_type(ast, frozenset(), names)
    except RecursionError:
        raise CelSyntaxError("expression nests too deeply") from None
    return CelProgram(source, ast, names)
