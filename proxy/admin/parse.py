"""Reading the console's commands: statements split at semicolons, words, quoted names and values."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.protocol.errors import PgError

SYNTAX_ERROR = "42601"


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # "SHOW POOLS", "PAUSE", "SET", ... (upper case)
    args: tuple[str, ...]  # the words after it (a quoted word without its quotes)
    text: str  # the statement as sent


def split_statements(sql: str) -> list[str]:
    """The statements of one Query message (semicolons inside quotes do not split)."""
    out, cur, quote = [], [], ""
    for ch in sql:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            cur.append(ch)
        elif ch == ";":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise PgError(SYNTAX_ERROR, "unterminated quoted string", severity="ERROR")
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def words(statement: str) -> list[str]:
    """Words, ``=`` on its own, 'values' and "names" unquoted (doubled quotes inside them kept once)."""
    out: list[str] = []
    i, n = 0, len(statement)
    while i < n:
        ch = statement[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            j, buf = i + 1, []
            while j < n:
                if statement[j] == ch:
                    if j + 1 < n and statement[j + 1] == ch:
                        buf.append(ch)
                        j += 2
                        continue
                    break
                buf.append(statement[j])
                j += 1
            out.append("".join(buf))
            i = j + 1
        elif ch == "=":
            out.append("=")
            i += 1
        else:
            j = i
            while j < n and not statement[j].isspace() and statement[j] not in "='\"":
                j += 1
            out.append(statement[i:j])
            i = j
    return out


def parse(statement: str) -> Command:
    w = words(statement)
    verb = w[0].upper()
    rest = w[1:]
    if verb == "SHOW":
        if not rest:
            raise PgError(SYNTAX_ERROR, "SHOW needs what to show, e.g. SHOW POOLS", severity="ERROR")
        return Command("SHOW " + rest[0].upper(), tuple(rest[1:]), statement)
    if verb == "SET":
        if len(rest) != 3 or (rest[1] != "=" and rest[1].upper() != "TO"):
            raise PgError(SYNTAX_ERROR, "SET takes key = value", severity="ERROR")
        return Command("SET", (rest[0].lower(), rest[2]), statement)
    return Command(verb, tuple(rest), statement)
