"""Fencing tokens.

A token must grow with every grant of a pool and never go backwards, also
when the service restarts with no memory of the last one, or when a shared
backend loses its record. So the next token is the larger of "one more than
the last" and the grant time in microseconds: after any restart the clock
has moved past every token given before, unless grants ran faster than a
million a second (they cannot: a server answers tens of thousands) or the
clock was stepped back by more than the time the service was down.
"""

#: Tokens count microseconds of the grant time: fine enough that a pool's
#: tokens never run ahead of the clock, coarse enough to stay below 2**53
#: (exact in JSON and JavaScript) until the year 2255.
TOKEN_RESOLUTION = 1_000_000


def next_token(last: int, now: float) -> int:
    floor = int(now * TOKEN_RESOLUTION)
    return last + 1 if last >= floor else floor
