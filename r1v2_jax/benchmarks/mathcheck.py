"""LaTeX answers compared through math-verify (our stand-in for the references' latex2sympy /
sympy ``parse_latex``): symbolic equivalence, and the numeric value of a constant expression.
Every parse and comparison is bounded by math-verify's own time limit (``timeout`` seconds)."""

from __future__ import annotations

import math

TIMEOUT = 5


def _parse(text: str, timeout: int):
    from math_verify import parse  # noqa: PLC0415  (math-verify and sympy take seconds to import)

    try:
        out = parse(f"${text}$", parsing_timeout=timeout)
        return out or parse(text, parsing_timeout=timeout)
    except Exception:  # noqa: BLE001 - an unparsable answer is simply not equivalent
        return []


def equivalent(gold: str, pred: str, timeout: int = TIMEOUT) -> bool:
    """math-verify's verdict that ``pred`` equals ``gold`` (False when either does not parse)."""
    from math_verify import verify  # noqa: PLC0415

    g, p = _parse(gold, timeout), _parse(pred, timeout)
    if not g or not p:
        return False
    try:
        return bool(verify(g, p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001
        return False


MAX_EXPONENT = 1000  # as the OlympiadBench judge's ``can_compute_power``: larger powers are not evaluated


def _evaluable(e) -> bool:
    """Whether evaluating ``e`` numerically is bounded: no power tower, no exponent beyond
    ``MAX_EXPONENT`` (``10^{10^{10}}`` would run mpmath for hours)."""
    import sympy  # noqa: PLC0415  (already imported by math-verify)

    for node in sympy.preorder_traversal(e):
        if isinstance(node, sympy.Pow):
            base, exp = node.as_base_exp()
            if exp.has(sympy.Pow) and base.is_number and exp.is_number:
                return False
            if exp.is_number and not exp.has(sympy.Pow) and abs(complex(exp.evalf(15))) > MAX_EXPONENT:
                return False
    return True


def value(text: str, timeout: int = TIMEOUT) -> float | None:
    """The real number a constant expression (``\\frac{\\sqrt{2}}{2}``, ``3\\times10^{8}``) stands
    for, or None (not a constant, not real, a power too large to evaluate: see :func:`_evaluable`)."""
    try:
        return float(text)
    except ValueError:
        pass
    if len(text) > 300:
        return None
    for e in _parse(text, timeout):
        try:
            if getattr(e, "is_number", False) and not e.free_symbols and _evaluable(e):
                v = complex(e.evalf(20))
                if abs(v.imag) < 1e-12 and math.isfinite(v.real):
                    return float(v.real)
        except Exception:  # noqa: BLE001 - e.g. a power too large to evaluate
            return None
    return None
