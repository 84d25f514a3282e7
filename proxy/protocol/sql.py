"""SQL text the proxy writes itself: quoting of literals and identifiers, and the
statements that make a server's session settings a client's."""

from __future__ import annotations


def quote_literal(value: str) -> str:
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    if name.isidentifier() and name.lower() == name and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def settings_sql(wanted: dict[str, str], applied: dict[str, str]) -> str:
    """SET/RESET statements that turn ``applied`` into ``wanted`` ('' if equal)."""
    # set_config() takes the value as the GUC's own string, as a startup packet
    # does: list-valued settings (search_path = 'a, b') keep their meaning
    sets = [f"set_config({quote_literal(k)}, {quote_literal(v)}, false)"
            for k, v in wanted.items() if applied.get(k) != v]
    parts = [f"SELECT {', '.join(sets)}"] if sets else []
    for k in applied:
        if k not in wanted:
            parts.append(f"RESET {quote_ident(k)}")
    return ";".join(parts)
