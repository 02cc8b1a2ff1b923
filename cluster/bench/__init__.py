"""Benchmark scripts: each prints a table and writes JSON."""


def print_table(rows: list[tuple[str, str, str]], title: str = "", out: str = "") -> None:
    """An aligned ``measure  value  target`` table, then where the JSON went."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title or 'measure':<{width}}  {'value':>8}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>8}  {target}")
    if out:
        print(f"\njson: {out}")
