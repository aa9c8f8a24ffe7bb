"""The style counts hold their limits (`python -m tests.style --list` names the places): `# fmt: skip` only for
tables, function-level imports only for optional heavy dependencies, no file over ~400 lines, no function over 60
lines without a comment saying why."""

from tests.style import LIMITS, counts


def test_style_counts_hold_their_limits():
    c = counts()
    over = {k: v for k, v in c.items() if len(v) > LIMITS[k]}
    assert not over, "\n".join(f"{k} ({len(v)} > {LIMITS[k]}): {', '.join(v)}" for k, v in over.items())
