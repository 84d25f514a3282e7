"""Remove the values from SQL text and EXPLAIN plans, with PostgreSQL's own lexer."""

from __future__ import annotations

from typing import Any

from pglast import parser as pg_parser

CUT = "…"  # marks where a text the lexer could not read was cut
CONSTANTS = frozenset(("SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"))
NUMBERS = frozenset(("ICONST", "FCONST"))
# the tokens a value can end with: after one of them, "-" is a binary minus
_VALUE_ENDS = CONSTANTS | {"IDENT", "UIDENT", "PARAM", "ASCII_41", "ASCII_93"}
# type names whose parenthesised modifiers may follow a cast: "::numeric(10,2)", "::bit varying(5)"
_TYPMOD_TYPES = frozenset(("VARYING", "CHARACTER", "CHAR_P", "VARCHAR", "NUMERIC", "DECIMAL_P", "DEC", "BIT",
                           "TIMESTAMP", "TIME", "INTERVAL", "FLOAT_P"))
_PLAN_REFS = frozenset(("SubPlan", "InitPlan"))  # "(hashed SubPlan 1)", "(InitPlan 2).col1"
_MAYBE_CONSTANT = frozenset("'$0123456789\x00")

# Plan keys whose values are names or fixed words, never expressions (PostgreSQL's explain.c)
NAME_KEYS = frozenset((
    "Node Type", "Parent Relationship", "Relation Name", "Schema", "Alias", "Index Name", "CTE Name",
    "Function Name", "Table Function Name", "Tuplestore Name", "Join Type", "Strategy", "Partial Mode",
    "Operation", "Scan Direction", "Command", "Sort Method", "Sort Space Type", "Sort Methods Used",
    "Custom Plan Provider", "Conflict Resolution", "Conflict Arbiter Indexes", "Trigger Name",
    "Constraint Name", "Relation", "Sampling Method", "Cache Mode",
))


class _Lexed:
    """A text's tokens (``None``: nothing readable) and where the readable part ends."""

    __slots__ = ("text", "tokens", "end", "max_param")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[Any] | None = None
        self.end = len(text)  # the text is used up to here; a cut is marked beyond
        self.max_param = 0
        if _MAYBE_CONSTANT.isdisjoint(text):
            return  # no quote, no $, no digit: no constant to find
        cut = text.find("\x00")  # the lexer stops at a NUL (a C string)
        if cut >= 0:
            self.end = cut
        try:
            tokens = pg_parser.scan(text[:self.end])
        except pg_parser.ParseError as e:
            at = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], int) else 0
            self.end = max(0, min(at, self.end))
            try:
                tokens = pg_parser.scan(text[:self.end])
            except Exception:
                tokens, self.end = [], 0
        except Exception:
            tokens, self.end = [], 0
        # every non-space character must belong to a token; where one does not, cut there
        pos = 0
        for i, t in enumerate(tokens):
            if text[pos:t.start].strip():
                tokens, self.end = tokens[:i], pos
                break
            pos = t.end + 1
        else:
            if text[pos:self.end].strip():
                self.end = pos
        self.tokens = tokens
        for t in tokens:
            if t.name == "PARAM":
                try:
                    self.max_param = max(self.max_param, int(text[t.start + 1:t.end + 1]))
                except ValueError:
                    pass

    def rebuild(self, number: int, plan: bool = False) -> tuple[str, int]:
        """(the text with its constants as ``$number``, ``$number+1``…, the next number).

        ``plan``: the text is a plan's, where ``SubPlan 1`` / ``InitPlan 1`` keep their numbers.
        """
        text, tokens = self.text, self.tokens
        if tokens is None:
            return text, number
        keep = _kept_constants(text, tokens, plan)
        out: list[str] = []
        pos = 0
        prev = None  # the token before the one at hand
        for i, t in enumerate(tokens):
            name = t.name
            if name in CONSTANTS and i not in keep:
                start = t.start
                # a sign in front of a number is part of the value when it is unary
                if name in NUMBERS and prev is not None and prev.name in ("ASCII_45", "ASCII_43") \
                        and (i < 2 or not _ends_value(tokens[i - 2])):
                    start = prev.start
                elif name == "SCONST" and prev is not None and prev.name == "NCHAR" and prev.end + 1 == t.start:
                    start = prev.start  # N'…', lexed as NCHAR then the string
                out.append(text[pos:start])
                out.append(f"${number}")
                number += 1
                pos = t.end + 1
            prev = t
        out.append(text[pos:self.end])
        if self.end < len(text):
            out.append(CUT)
        return "".join(out), number


def _ends_value(t: Any) -> bool:
    return t.name in _VALUE_ENDS or t.kind in ("UNRESERVED_KEYWORD", "COL_NAME_KEYWORD")


def _kept_constants(text: str, tokens: list[Any], plan: bool) -> set[int]:
    """Indexes of the number tokens that are not values: cast type modifiers, and in a plan the
    numbers of SubPlan/InitPlan references."""
    keep: set[int] = set()
    for i, t in enumerate(tokens):
        if plan and t.name == "ICONST" and i and tokens[i - 1].name == "IDENT" \
                and text[tokens[i - 1].start:tokens[i - 1].end + 1] in _PLAN_REFS:
            keep.add(i)
        elif t.name == "ASCII_40" and i >= 2 and tokens[i - 1].name in _TYPMOD_TYPES:
            j = i - 1  # back over the type's words to the "::"
            while j > 0 and tokens[j].kind != "NO_KEYWORD" and tokens[j].kind != "RESERVED_KEYWORD":
                j -= 1
            if tokens[j].name != "TYPECAST" or i - j > 4:
                continue
            k, numbers = i + 1, []
            while k + 1 < len(tokens) and tokens[k].name == "ICONST" \
                    and tokens[k + 1].name in ("ASCII_44", "ASCII_41"):
                numbers.append(k)
                if tokens[k + 1].name == "ASCII_41":
                    keep.update(numbers)
                    break
                k += 2
    return keep


def scrub_sql(text: str, first: int | None = None) -> str:
    """``text`` with its constants replaced by ``$n`` (numbered from ``first``, else past its own ``$k``).

    Plans sampled by ``proxy.inspect.explain`` carry the statement's values in
    their expression strings (``"Filter": "(ssn = 'SECRET'::text)"``), and so may
    statement texts read from the server (``pg_stat_activity.query``).  Before
    they are stored, every constant token that ``pglast.parser.scan`` (libpg_query's
    copy of PostgreSQL's lexer) reports is replaced by a placeholder:

    - string constants in every spelling: ``'…'`` with doubled quotes, ``E'…'``
      escapes, dollar quotes ``$$…$$`` / ``$tag$…$tag$``, ``U&'…'``, national
      ``N'…'``, adjacent strings continued over a newline;
    - numbers (integers, decimals, exponents, ``0x1F``, ``1_000``), with a unary
      minus or plus in front of them;
    - bit strings ``B'101'`` and hex strings ``X'1F'``.

    The placeholder is ``$n``, numbered like ``pg_stat_statements`` and
    ``pglast.parser.normalize`` number theirs: from one past the highest ``$k``
    parameter already in the text (or, for a plan, anywhere in the plan), so a
    real parameter of a generic plan keeps its number and a removed value never
    shares one.  What follows a constant stays: ``'x'::text`` becomes ``$1::text``.

    Kept as they are: identifiers (quoted or not, ``col1``, ``"2nd"``), keywords
    (``NULL``, ``TRUE``, ``FALSE``), operators, comments, ``$k`` parameters, type
    modifiers of a cast (``::numeric(10,2)``, ``::character varying(20)``) and, in
    plans, the numbers of ``SubPlan 1`` / ``InitPlan 2`` references.

    It fails closed: a text the lexer cannot read to its end (an unterminated
    quote, as in a truncated ``pg_stat_activity.query``; a NUL byte) is cut where
    it stops being readable and ``…`` marks the cut; any character the tokens do
    not account for (other than white space) drops the text the same way.
    """
    lexed = _Lexed(text)
    return lexed.rebuild(first if first is not None else lexed.max_param + 1)[0]


def scrub_plan(plan: Any) -> Any:
    """A copy of an EXPLAIN (FORMAT JSON) result with the constants of every expression string replaced.

    In a plan (the JSON of ``EXPLAIN (FORMAT JSON)``), every string is scrubbed,
    in nested objects and lists alike, except the values of keys that only ever
    hold names or fixed words (``Node Type``, ``Relation Name``, ``Alias``,
    ``Index Name``…: ``NAME_KEYS``); numbers (costs, row estimates, timings) and
    booleans are left alone, so the plan keeps its shape.

    Cost: one ``scan`` (some 20 to 50 µs) per string that has a quote, a ``$`` or
    a digit in it; the others cannot hold a constant and are not scanned.  Plans are sampled a few times a
    minute at most, off the relay's path.
    """
    found: list[_Lexed] = []

    def collect(node: Any, key: str | None) -> None:
        if isinstance(node, str):
            if key not in NAME_KEYS:
                found.append(_Lexed(node))
        elif isinstance(node, dict):
            for k, v in node.items():
                collect(v, k)
        elif isinstance(node, list):
            for v in node:
                collect(v, key)

    collect(plan, None)
    number = max((x.max_param for x in found), default=0) + 1
    todo = iter(found)

    def rebuild(node: Any, key: str | None) -> Any:
        nonlocal number
        if isinstance(node, str):
            if key in NAME_KEYS:
                return node
            text, number = next(todo).rebuild(number, plan=True)
            return text
        if isinstance(node, dict):
            return {k: rebuild(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [rebuild(v, key) for v in node]
        return node

    return rebuild(plan, None)
