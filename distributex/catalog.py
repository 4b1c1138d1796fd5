"""Which pools exist: the named ones, and the patterns that make pools on demand.

A ``pattern:`` entry (fnmatch syntax: ``*``, ``?``, ``[seq]``, ``[!seq]``)
stands for every pool name it matches: such a pool exists from its first
request, with the entry's settings, and is forgotten once idle. A named
pool wins over a pattern; two patterns that could match the same name are a
configuration error, so that which settings a pool gets never depends on
the order of the file.
"""

from __future__ import annotations

import fnmatch
from collections import deque
import string
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple


#: The 2014 default lease: long enough for a Puppet run, short enough that a
#: crashed holder does not block the pool for a whole day.
DEFAULT_EXPIRE = 1800.0
DEFAULT_MAXLOCKS = 1
#: The contract's queue limit: far beyond any cluster's honest waiters, low
#: enough that a runaway loop of /wait cannot take the server's memory.
DEFAULT_MAX_WAITERS = 100_000

#: The characters of a pool name (contract section 2).
NAME_ALPHABET = frozenset(string.ascii_letters + string.digits + "_.:-")
#: Pool specs made for on-demand names, kept so that a busy pool does not
#: build its spec on every request; bounded, so that a stream of distinct
#: names cannot grow memory.
SPEC_CACHE_SIZE = 4096

_Token = Tuple[str, FrozenSet[str]]  # ("*", any) or ("1", the characters one position accepts)


@dataclass(frozen=True)
class PoolSpec:
    """A pool as configured: what the pool rules need to know of it."""

    name: str
    expire: float = DEFAULT_EXPIRE  # 0 means a hold never expires
    maxlocks: int = DEFAULT_MAXLOCKS
    servers: Optional[FrozenSet[str]] = None  # None: any host may ask
    max_waiters: int = DEFAULT_MAX_WAITERS
    pattern: Optional[str] = None  # the pattern: entry that made it, for a pool on demand

    def allows(self, host: str) -> bool:
        return self.servers is None or host in self.servers


class PatternError(ValueError):
    """A pattern that cannot be used; str() says why."""


@dataclass(frozen=True)
class PoolPattern:
    """A ``pattern:`` entry: the settings of every pool whose name matches."""

    pattern: str
    template: PoolSpec  # name unused: the settings a matching pool gets

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def spec(self, name: str) -> PoolSpec:
        return replace(self.template, name=name, pattern=self.pattern)


class Catalog(Mapping[str, PoolSpec]):
    """The configured pools. As a mapping: the named pools, in file order.
    :meth:`find` also knows the names that a pattern makes a pool of."""

    def __init__(self, named: Optional[Dict[str, PoolSpec]] = None,
                 patterns: Optional[List[PoolPattern]] = None) -> None:
        self.named: Dict[str, PoolSpec] = dict(named or {})
        self.patterns: List[PoolPattern] = list(patterns or [])
        self._on_demand = lru_cache(maxsize=SPEC_CACHE_SIZE)(self._match)

    def find(self, name: str) -> Optional[PoolSpec]:
        """The pool of that name, named or on demand; None if there is none."""
        spec = self.named.get(name)
        if spec is not None or not self.patterns:
            return spec
        return self._on_demand(name)

    def _match(self, name: str) -> Optional[PoolSpec]:
        for pattern in self.patterns:
            if pattern.matches(name):
                return pattern.spec(name)
        return None

    def __getitem__(self, name: str) -> PoolSpec:
        return self.named[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.named)

    def __len__(self) -> int:
        return len(self.named)

    def __repr__(self) -> str:
        return f"Catalog({list(self.named)}, patterns={[p.pattern for p in self.patterns]})"


# -- patterns ------------------------------------------------------------------------

def check_pattern(pattern: str) -> List[_Token]:
    """The pattern as tokens, or PatternError: only pool-name characters,
    ``*``, ``?`` and complete ``[...]`` sets, and at least one wildcard."""
    if not pattern or len(pattern) > 128:
        raise PatternError("must be 1 to 128 characters")
    tokens: List[_Token] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if not (tokens and tokens[-1][0] == "*"):  # ** is *
                tokens.append(("*", NAME_ALPHABET))
            i += 1
        elif c == "?":
            tokens.append(("1", NAME_ALPHABET))
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise PatternError(f"'[' at position {i + 1} is never closed")
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            chars = _set_chars(body[1:] if negate else body)
            allowed = NAME_ALPHABET - chars if negate else chars & NAME_ALPHABET
            if not allowed:
                raise PatternError(f"[{body}] matches no character of a pool name")
            tokens.append(("1", frozenset(allowed)))
            i = end + 1
        elif c in NAME_ALPHABET:
            tokens.append(("1", frozenset(c)))
            i += 1
        else:
            raise PatternError(f"{c!r} is neither a pool name character nor a wildcard")
    if all(kind == "1" and len(chars) == 1 for kind, chars in tokens):
        raise PatternError("has no wildcard (use name: for a single pool)")
    return tokens


def _set_chars(body: str) -> FrozenSet[str]:
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            if low > high:
                raise PatternError(f"range {low}-{high} is backwards")
            chars.update(chr(code) for code in range(ord(low), ord(high) + 1))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return frozenset(chars)


def overlap(a: str, b: str) -> Optional[str]:
    """The shortest pool name both patterns match, or None when there is none.

    A search over pairs of positions in the two patterns (the product of
    their automata): from (0, 0), consume one character that both accept,
    or skip a ``*``; a name matches both when both ends are reached. Breadth
    first, skips before characters (0-1 BFS), so the name found is short.
    """
    ta, tb = check_pattern(a), check_pattern(b)
    start = (0, 0)
    came_from: Dict[Tuple[int, int], Tuple[Tuple[int, int], str]] = {}
    seen = {start}
    frontier = deque([start])
    while frontier:
        state = frontier.popleft()
        i, j = state
        if i == len(ta) and j == len(tb):
            return _path(came_from, state)
        moves: List[Tuple[Tuple[int, int], str]] = []
        if i < len(ta) and ta[i][0] == "*":
            moves.append(((i + 1, j), ""))
        if j < len(tb) and tb[j][0] == "*":
            moves.append(((i, j + 1), ""))
        if i < len(ta) and j < len(tb):
            common = ta[i][1] & tb[j][1]
            if common:
                ni = i if ta[i][0] == "*" else i + 1
                nj = j if tb[j][0] == "*" else j + 1
                moves.append(((ni, nj), min(common)))
        for nxt, char in moves:
            if nxt not in seen:
                seen.add(nxt)
                came_from[nxt] = (state, char)
                if char:
                    frontier.append(nxt)
                else:
                    frontier.appendleft(nxt)
    return None


def _path(came_from: Dict[Tuple[int, int], Tuple[Tuple[int, int], str]], state: Tuple[int, int]) -> str:
    chars = []
    while state in came_from:
        state, char = came_from[state]
        chars.append(char)
    return "".join(reversed(chars))

