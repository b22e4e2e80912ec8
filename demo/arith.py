"""Worked arithmetic for the analysis channel: digit by digit from the right, every carry and
borrow written out, so each step is a lookup a small model can learn."""

from __future__ import annotations


def spaced(s: str) -> str:
    return " ".join(s)


def add_steps(x: int, y: int, width: int) -> str:
    xs, ys = f"{x:0{width}d}", f"{y:0{width}d}"
    carry, steps, digits = 0, [], []
    for i in range(width - 1, -1, -1):
        a, b = int(xs[i]), int(ys[i])
        s = a + b + carry
        steps.append(f"{a}+{b}+{carry}={s}, write {s % 10} carry {s // 10}.")
        digits.append(str(s % 10))
        carry = s // 10
    if carry:
        digits.append("1")
    head = f"{x} is {spaced(xs)}. {y} is {spaced(ys)}. "
    return head + " ".join(steps) + f" Digits {spaced(''.join(reversed(digits)))} make {x + y}."


def sub_steps(x: int, y: int) -> str:
    """x >= y."""
    xs, ys = f"{x:03d}", f"{y:03d}"
    borrow, steps, digits = 0, [], []
    for i in range(2, -1, -1):
        a, b = int(xs[i]), int(ys[i])
        v = a - b - borrow
        if v < 0:
            steps.append(f"{a}-{b}-{borrow} is negative, so {a}+10-{b}-{borrow}={v + 10}, borrow 1.")
            digits.append(str(v + 10))
            borrow = 1
        else:
            steps.append(f"{a}-{b}-{borrow}={v}, borrow 0.")
            digits.append(str(v))
            borrow = 0
    head = f"{x} is {spaced(xs)}. {y} is {spaced(ys)}. "
    return head + " ".join(steps) + f" Digits {spaced(''.join(reversed(digits)))} make {x - y}."


def compare_steps(x: int, y: int) -> str:
    """Which of two numbers up to 999 is smaller, from the first digit where they differ: a
    whole-number comparison in one step was a 58-minute model's most common subtraction miss."""
    xs, ys = f"{x:03d}", f"{y:03d}"
    steps = []
    for a, b in zip(xs, ys, strict=True):
        if a == b:
            steps.append(f"{a}={b}.")
            continue
        rel = "<" if a < b else ">"
        steps.append(f"{a}{rel}{b}, so {x} is {'less' if a < b else 'more'} than {y}.")
        break
    else:
        steps.append(f"So {x} equals {y}.")
    return f"Compare {spaced(xs)} with {spaced(ys)}: " + " ".join(steps)


def signed_sub_steps(x: int, y: int) -> str:
    compare = compare_steps(x, y) + " "
    if x >= y:
        return compare + sub_steps(x, y)
    return compare + f"Compute {y}-{x} and negate. " + sub_steps(y, x) + f" Negated: {x - y}."


def mul_steps(a: int, b: int) -> str:
    """a, b < 100: one partial product per digit of b, then their sum."""
    b1, b0 = divmod(b, 10)
    parts = []
    for d in (b0, b1):
        a1, a0 = divmod(a, 10)
        p0 = a0 * d
        p1 = a1 * d + p0 // 10
        # the multiply and the carry as two lookups: "a*d+c=" in one was the usual miss
        parts.append(
            f"{a0}*{d}={p0}, write {p0 % 10} carry {p0 // 10}. {a1}*{d}={a1 * d}, {a1 * d}+{p0 // 10}={p1}."
            f" Digits {spaced(str(p1))} {p0 % 10} make {a * d}. So {a}*{d}={a * d}."
        )
    shifted = a * b1 * 10
    return (
        f"{a} is {spaced(f'{a:02d}')}. {b} is {spaced(f'{b:02d}')}. {parts[0]} {parts[1]}"
        f" Shifted: {shifted}. Add {a * b0} and {shifted}: " + add_steps(a * b0, shifted, 4)
    )
