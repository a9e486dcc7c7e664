"""The CEL evaluator behind ``request-attribute-reporter``: CEL's typing (no mixed-type
arithmetic, cross-type numeric comparison and equality), its error rules (commutative ``&&`` and
``||``, overflow, missing keys), literals and macros, and its bounds on time and size."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from kvaware_scorer.scheduler.cel import (
    MAX_EXPRESSION_CHARS,
    CelError,
    CelSyntaxError,
    UInt,
    compile_cel,
)

USAGE = {"prompt_tokens": 100.0, "completion_tokens": 20.0, "total_tokens": 120.0}


def ev(expr: str, usage: dict[str, Any] | None = None) -> Any:
    return compile_cel(expr, {"usage"}).evaluate({"usage": USAGE if usage is None else usage})


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("usage.prompt_tokens + usage.completion_tokens", 120.0),
        ("has(usage.completion_tokens) && !has(usage.nope)", True),
        ("usage.prompt_tokens > 50 && usage.prompt_tokens <= 100", True),  # double vs int
        ("int(usage.total_tokens * 0.5)", 60),
        ("usage.total_tokens / 3.0 > 39.9", True),
        (".usage.total_tokens", 120.0),
        ("-9223372036854775808", -(2**63)),
        ("7 / -2", -3),  # truncated toward zero, as Go
        ("7 % -2", 1),
        ("-7 % 2", -1),
        ("0x1F + 1", 32),
        ("2u * 3u", UInt(6)),
        ("1e3", 1000.0),
        (".5 + .5", 1.0),
        ("'a\\x41\\u00e9\\101' + r'\\n'", "aAéA\\n"),
        ("b'\\xff' + b'\\000'", b"\xff\x00"),
        ('"""two\nlines"""', "two\nlines"),
        ("size('héllo') + size([1, 2]) + size({'a': 1}) + 'ab'.size()", 10),
        ("dyn(1) == 1.0 && dyn(1u) == 1 && dyn('a') != 1 && [1, 2] == [1.0, 2u]", True),
        ("{'a': 1} == {'a': 1.0} && 2 in [1, 2] && 'a' in {'a': 1}", True),
        ("{1: 'x'}[1.0] + {true: 'y'}[true]", "xy"),
        ("[1, 2, 3].all(x, x > 0) && [1, 2, 3].exists(x, x == 2)", True),
        ("[1, 2, 3].exists_one(x, x > 1)", False),
        ("[1, 2, 3].map(x, x * 2)", [2, 4, 6]),
        ("[1, 2, 3].map(x, x > 1, x * 10)", [20, 30]),
        ("[1, 2, 3].filter(x, x % 2 == 1)", [1, 3]),
        ("{'a': 1, 'b': 2}.filter(k, k != 'a')", ["b"]),
        ("false && 1 / 0 == 1", False),  # errors are absorbed by a deciding side
        ("1 / 0 == 1 || true", True),
        ("[0, 1].exists(x, 1 / x > 0)", True),
        ("type(1) == int && type(1.0) == double && type('') == string", True),
        ("string(1.5) + string(2) + string(true)", "1.52true"),
        ("double('2.5') + double(1)", 3.5),
        ("int('-12') + int(3.9) + int(-3.9)", -12),
        ("uint(3.0)", UInt(3)),
        ("bool('false') || bytes('a') == b'a'", True),
        ("'abc'.startsWith('a') && 'abc'.endsWith('c') && 'abc'.contains('b')", True),
        ("true ? dyn(1) : 'a'", 1),
        ("dyn(1) + 1", 2),
        ("1.0 / 0.0 > 1e308 && -1.0 / 0.0 < -1e308", True),
        ("[1, 2][1]", 2),
    ],
)
def test_values(expr: str, want: Any) -> None:
    got = ev(expr)
    assert got == want and type(got) is type(want)


def test_nan() -> None:
    assert math.isnan(ev("0.0 / 0.0"))
    assert ev("0.0 / 0.0 == 0.0 / 0.0") is False
    assert ev("0.0 / 0.0 < 1.0") is False


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("usage.prompt_tokens + 1", "no such overload: double + int"),  # JSON numbers are doubles
        ("usage.nope", "no such key"),
        ("usage.prompt_tokens.x", "has no field"),
        ("9223372036854775807 + 1", "int overflow"),
        ("-9223372036854775807 - 2", "int overflow"),
        ("-9223372036854775808 / -1", "int overflow"),
        ("1u - 2u", "uint overflow"),
        ("10 / 0", "division by zero"),
        ("10 % 0", "modulus by zero"),
        ("int(1e30)", "int overflow"),
        ("int(0.0 / 0.0)", "non-finite"),
        ("uint(-1)", "uint overflow"),
        ("int('x')", "cannot read"),
        ("int(' 12')", "cannot read"),
        ("int('1_000')", "cannot read"),
        ("int('\u0663')", "cannot read"),  # a non-ASCII digit
        ("double('1_0')", "cannot read"),
        ("double('1e999')", "out of range"),
        ("int(-9223372036854775808.0)", "int overflow"),  # CEL's open interval
        ("uint(-0.5)", "uint overflow"),
        ("-9223372036854775808 % -1", "int overflow"),
        ("[1][1]", "out of range"),
        ("{'a': 1, 'a': 2}", "repeated map key"),
        ("[0, 1].all(x, 1 / x > 0)", "division by zero"),  # no false to decide it
        ("dyn(1) && true", "logical operator"),
        ("dyn('a') ? 1 : 2", "condition"),
        ("dyn(1) < 'a'", "no such overload"),
        ("-dyn(1u)", "no such overload"),
        ("dyn(1.5) % 1.0", "no such overload"),
        ("size(dyn(1))", "no such overload"),
        ("dyn(1).contains('a')", "no such overload"),
    ],
)
def test_errors(expr: str, message: str) -> None:
    with pytest.raises(CelError, match=re.escape(message)):
        ev(expr)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty"),
        ("request.size", "undeclared reference to 'request'"),
        ("usage +", "unexpected"),
        ("(usage", "expected '\\)'"),
        ("1 + 1.0", r"no overload of '\+' for \(int, double\)"),
        ("'a' - 'b'", "no overload"),
        ("'a' < 1", "no overload"),
        ("1 ? 2 : 3", "condition is int"),
        ("!1", "'!' applied to int"),
        ("9223372036854775808", "out of range"),
        ("18446744073709551616u", "out of range"),
        ("has(usage)", "field selection"),
        ("usage.foo(1)", "unknown method foo"),
        ("bar(1)", "unknown function bar"),
        ("'a'.matches('a')", "unknown method matches"),  # backtracking regexes: not offered
        ("[1].all(1, true)", "variable name"),
        ("if", "reserved word"),
        ("1 == 1.0", "no overload of '=='"),
        ("true ? 1 : 'a'", "different types"),
        ("1e999", "invalid double literal"),
        ("1" * 5000, "out of range"),
        ("-" + "9" * 30, "out of range"),
        ("b'\ud800'", "surrogate"),
        ("0X1F", "bad number"),
        ("\u0661 + \u0663", "unexpected character"),  # non-ASCII digits
        ("'abc", "unterminated"),
        ("'\\q'", "unknown escape"),
        ("b'\\u0041'", "bad"),
        ("1 $ 2", "unexpected character"),
        ("12abc", "bad number"),
        ("+".join(["1"] * 200), "nests deeper"),
        ("(" * 500 + "1" + ")" * 500, "nests deeper"),
        ("1" * (MAX_EXPRESSION_CHARS + 1), "longer than"),
    ],
)
def test_compile_errors(expr: str, message: str) -> None:
    with pytest.raises(CelSyntaxError, match=message):
        compile_cel(expr, {"usage"})


def test_work_and_size_are_bounded() -> None:
    """A program whose work or values explode fails with an error instead of running on."""
    items = "[" + ",".join(str(i) for i in range(1000)) + "]"
    with pytest.raises(CelError, match="steps"):
        ev(f"{items}.map(x, {items}.map(y, x * y))")
    with pytest.raises(CelError, match=r"steps|larger"):
        ev(f"{items}.all(x, {items}.exists(y, y == -1) == false)")
    text = "'" + "a" * 1200 + "'"
    with pytest.raises(CelError, match="steps"):
        ev(f"{items}.map(x, {text} + {text} + {text})")  # 3.6 MB of strings otherwise


def test_reserved_words_are_field_and_method_names() -> None:
    """Only an identifier in primary position is checked against the reserved words."""
    assert (
        compile_cel("{'if': 1}.if + usage.package", {"usage"}).evaluate({"usage": {"package": 2}})
        == 3
    )


def test_nested_equality_lookups_and_conversions_are_paid_for() -> None:
    """Comparing self-similar nested lists, int-keyed maps and copying by conversions count
    against the step budget: each fails fast instead of running for seconds or gigabytes."""
    import time

    e = "[0]"
    for i in range(7):
        e = f"[{e}].map(v{i}, [{', '.join([f'v{i}'] * 8)}])[0]"
    big_map = "{" + ",".join(f"{i}:0" for i in range(300)) + "}"
    s = "'" + "ab" * 1000 + "'"
    items = "[" + ",".join("0" * 1 for _ in range(2000)) + "]"
    for expr, fails in (
        (f"{e} == {e}", True),  # 8**7 leaves compared: over the budget
        (f"[{big_map}].map(m, [" + ",".join(["0"] * 80) + "].map(z, m == m))[0][0]", False),
        (f"{items}.map(x, bytes({s}))", True),  # 8 MB of copies: over the budget
    ):
        t0 = time.perf_counter()
        if fails:
            with pytest.raises(CelError, match="steps"):
                ev(expr)
        else:
            assert ev(expr) is True  # int-keyed map lookups are hashed, not scanned
        assert time.perf_counter() - t0 < 2.0, expr[:60]


def test_messages_about_values_are_short() -> None:
    """A huge value in an error message is abbreviated (the message stays small)."""
    e = "[0]"
    for i in range(6):
        e = f"[{e}].map(v{i}, [{', '.join([f'v{i}'] * 8)}])[0]"
    with pytest.raises(CelError) as err:
        ev(f"{{'a': 1}}[{e}]")
    assert len(str(err.value)) < 300


def test_map_key_depth_is_checked_and_bool_keys_stay_apart() -> None:
    """A long chain inside a map key counts toward the nesting bound; true and 1 are distinct
    keys, while numeric keys match across int, uint and double."""
    with pytest.raises(CelSyntaxError, match="nests deeper"):
        compile_cel("{" + " + ".join(["1"] * 200) + ": 1}", {"usage"})
    assert ev("{true: 'b', 1: 'i'}[true] + {true: 'b', 1: 'i'}[1u] + {1: 'x'}[1.0]") == "bix"
    assert ev("{true: 1, false: 2}.map(k, k)") == [True, False]
    with pytest.raises(CelError, match="repeated map key"):
        ev("{1: 'a', 1u: 'b'}")


def test_comprehension_variable_is_scoped() -> None:
    """The iteration variable shadows a declared one only inside its macro."""
    prog = compile_cel("[1, 2].map(usage, usage * 2) + [size(usage)]", {"usage"})
    assert prog.evaluate({"usage": {"a": 1.0}}) == [2, 4, 1]
