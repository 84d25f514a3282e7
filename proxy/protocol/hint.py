"""Which statement texts the pooling rules need to see at all.

The relay hands each Query/Parse text to a hook (``Relay.on_query``): the
session-state rule (transaction mode) and the DROP DATABASE fence.  Nearly
every statement an application runs (SELECT, INSERT, UPDATE, DELETE, BEGIN,
COMMIT with inline literals, so each text is new and no cache helps) concerns
neither, and calling into Python for it cost more than the relaying.
``worth_a_look`` is the cheap test that lets the relay skip the hook: it must
answer True for every text either rule acts on (a superset; a True costs only
the full check), and it looks at ASCII only:

- any character outside ASCII (Unicode whitespace, case folding: the full
  check decides);
- a first word (after ASCII whitespace) that is one of ``SESSION_WORDS``, or
  that begins with drop, alter or create; a first character ``-`` or ``/``
  (a comment first) or one of the ASCII separators \\x1c-\\x1f (which
  ``str.lstrip`` strips);
- a ``;`` other than one final ``;`` followed only by whitespace (several
  statements);
- ``advisory_lock`` anywhere, or both ``into`` and ``temp`` (case-insensitive).

In session mode the hook is the fence alone, which acts only on a text whose
first word begins with drop, alter or create (``proxy.session.fence``):
``might_fence`` is that part of the test, and stops after the first word
(pgbench's SELECT costs a few comparisons instead of a pass over its bytes).

The compiled relay (``_core.pyx``) has the same tests over the message bytes;
tests/test_relay_twins.py checks the twins agree and that each test is a
superset of the rules' own (``might_leave_state``, ``databases_to_fence``).
"""

from __future__ import annotations

# the first words after which a statement may leave session state behind
# (proxy.session.rules) -- drop/alter/create (prefixes) are the fence's
SESSION_WORDS = frozenset(("set", "reset", "listen", "unlisten", "load", "prepare", "deallocate", "discard",
                           "declare", "create"))
_FENCE_PREFIXES = ("drop", "alter", "create")
_SPACE = " \t\n\x0b\x0c\r"
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _first_word(text: str) -> str | None:
    """The first word, lower case, after ASCII whitespace ("" when there is none); None when
    what comes first needs the full check (a comment, a separator str.lstrip strips, or a
    character outside ASCII: Unicode whitespace or case folding)."""
    i, n = 0, len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    if i == n:
        return ""
    c = text[i]
    if c in "-/\x1c\x1d\x1e\x1f" or not c.isascii():
        return None
    j = i
    while j < n and text[j] in _WORD_CHARS:
        j += 1
    return text[i:j].lower()


def might_fence(text: str) -> bool:
    """False only when the DROP DATABASE fence cannot act on ``text`` (session mode's hook)."""
    word = _first_word(text)
    return word is None or word.startswith(_FENCE_PREFIXES)


def worth_a_look(text: str) -> bool:
    """False only when no pooling rule can act on ``text`` (see the module's docstring)."""
    if not text.isascii():
        return True
    word = _first_word(text)
    if word is None or word in SESSION_WORDS or word.startswith(_FENCE_PREFIXES):
        return True
    semi = text.find(";")
    if semi >= 0 and (semi != len(text.rstrip(_SPACE)) - 1):
        return True
    low = text.lower()
    return "advisory_lock" in low or ("into" in low and "temp" in low)
