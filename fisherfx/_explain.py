"""Which engine serves each parameter, and why: :func:`explain`.

``engine="auto"`` (the default of every estimator) computes each parameter with the tap engine
where its checks pass and with the generic engine (per-sample ``vjp``, typically 10–100× the cost)
for the rest, silently. :func:`explain` runs the tap engine's checks on a batch, as the estimator
called with the same options would, and returns which parameters fall back and the reason
(see ``docs/engines.md``, "How engine="auto" chooses").

It costs one tap-engine call (one batched forward and its backwards); the generic engine is not
run.
"""

import inspect
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from torch import Tensor

from ._errors import FisherError
from .engines import taps
from .fisher import OPTIONS, check_options, check_params, diag_fisher, output_width, prepare_batch
from .groups import Groups, check_groups
from .problems import Problem

EngineName = Literal["taps", "generic"]

# diag_fisher's defaults, so that explain(...) and diag_fisher(...) with the same options agree
_DEFAULTS = {name: p.default for name, p in inspect.signature(diag_fisher).parameters.items() if name in OPTIONS}

ASKED = "engine='generic' was asked"

# short names of the tap engine's reasons, for the table (the full reason is in the legend)
CODES = {
    taps.NO_LAYER: "no layer",
    taps.OUTSIDE: "outside",
    taps.MIXING: "mixing",
    taps.NO_SAMPLES: "no samples",
    taps.MIXED_FORMS: "mixed forms",
    ASKED: "asked",
}


class Served(NamedTuple):
    """One parameter: the engine that computes it and why.

    ``reason`` is the tap engine's full reason (``""`` for ``engine="taps"``), ``code`` a short
    name of it (``"no layer"``, ``"outside"``, ``"mixing"``, ``"no samples"``, ``"mixed forms"``,
    ``"asked"`` for ``engine="generic"``; ``""`` when served by taps).
    """

    name: str
    engine: EngineName
    reason: str
    numel: int
    shape: tuple[int, ...]
    code: str = ""


class Explanation(NamedTuple):
    """Which engine serves each parameter: ``rows`` in the order of ``params`` (or of ``groups``).

    ``print(explanation)`` shows an aligned table (:meth:`table`) with a one-line
    :attr:`summary`; :attr:`generic` lists the parameters left to the generic engine.
    """

    rows: list[Served]
    engine: str = "auto"  # the engine option the explained call would run with

    @property
    def generic(self) -> list[str]:
        """Names computed by the generic engine (the slow fallback)."""
        return [r.name for r in self.rows if r.engine == "generic"]

    @property
    def taps(self) -> list[str]:
        """Names served by the tap engine."""
        return [r.name for r in self.rows if r.engine == "taps"]

    @property
    def by_name(self) -> dict[str, Served]:
        """``{name: Served}``."""
        return {r.name: r for r in self.rows}

    @property
    def share(self) -> float:
        """Fraction of the parameter entries (``numel``) computed by the generic engine."""
        total = sum(r.numel for r in self.rows)
        return sum(r.numel for r in self.rows if r.engine == "generic") / total if total else 0.0

    @property
    def summary(self) -> str:
        """One line: how many parameters, and what share of the entries, go to the generic engine."""
        n, total = len(self.rows), sum(r.numel for r in self.rows)
        slow = [r for r in self.rows if r.engine == "generic"]
        if not slow:
            return f"all {n} parameters ({total:,} entries) are served by the tap engine"
        entries = sum(r.numel for r in slow)
        line = (f"generic engine: {len(slow)} of {n} parameters, {entries:,} of {total:,} entries "
                f"({100 * self.share:.1f}%); tap engine: {n - len(slow)}")
        if self.engine == "taps":
            line += "; engine='taps' raises FisherError for the generic ones"
        return line

    def table(self) -> str:
        """An aligned text table (name, shape, numel, engine, reason), the summary and the reasons in full."""
        head = ("name", "shape", "numel", "engine", "reason")
        body = [(r.name, "[" + ", ".join(map(str, r.shape)) + "]", f"{r.numel:,}", r.engine, r.code or r.reason)
                for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(row: tuple[str, ...]) -> str:
            cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        lines = [line(head), line(tuple("-" * w for w in widths)), *map(line, body), "", self.summary]
        legend = {r.code: r.reason for r in self.rows if r.code and r.code != r.reason}
        lines += [f"  {code}: {reason}" for code, reason in legend.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain(problem: Problem, params: Mapping[str, Tensor], batch: Any, groups: Groups | None = None,
            **options: Any) -> Explanation:
    """Which parameters the tap engine serves and which fall back to the generic engine, and why.

    Runs the tap engine's checks as :func:`diag_fisher` (or, with ``groups``, :func:`group_fisher`)
    called with the same arguments would, without forcing ``engine="taps"`` and without running
    the generic engine: one batched forward and the tap engine's backwards. Which parameters are
    served depends on the model, the batch's shapes, ``kind`` and ``per`` (``per="token"`` and
    ``kind="exact"`` on sequences serve only the layers after the last attention).

    Args:
        problem, params, batch: as :func:`diag_fisher`.
        groups: as :func:`group_fisher`; then only the parameters named in it are explained.
        **options: the options of :func:`diag_fisher` (``kind``, ``n_samples``, ``generator``,
            ``per``, ``normalize``, ``engine``, ``dtype``, ``chunk_size``, ``storage_dtype``,
            ``device``), validated as there. With ``engine="generic"`` every parameter is
            generic (reason ``"engine='generic' was asked"``) and no tap engine runs.

    Returns:
        :class:`Explanation`: ``rows`` of :class:`Served` ``(name, engine, reason, numel, shape,
        code)``, ``.generic`` (the fallback names), ``.share`` (their fraction of the entries),
        ``.summary``; ``print()`` it for a table.

    Raises:
        FisherError: as :func:`diag_fisher` (bad options, unknown parameters, a batch that does not
            fit the model) and :func:`group_fisher` (a group pattern that does not fit).

    """
    where = "explain"
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise FisherError(f"{where}: unknown options {unknown}; expected some of {list(OPTIONS)}")
    opts = {**_DEFAULTS, **options}
    check_options(where, opts["kind"], opts["n_samples"], opts["per"], opts["normalize"], opts["engine"],
                  opts["dtype"], opts["chunk_size"])
    params = check_params(where, problem, params)
    if groups is None:
        names = list(params)
        requests = {name: taps.Request() for name in names}
    else:
        checked = check_groups(groups, params, where)
        names = list(checked)
        requests = {name: taps.Request(g.pattern, g.sizes) for name, g in checked.items()}
    b = prepare_batch(where, problem, params, batch, opts["kind"], opts["n_samples"], opts["generator"],
                      opts["normalize"])
    if opts["engine"] == "generic":
        missing, width = dict.fromkeys(names, ASKED), None
    else:
        result = taps.estimate(problem, params, b.prepared, requests, kind=opts["kind"], per=opts["per"],
                               noise=b.noise, dtype=opts["dtype"], chunk_size=opts["chunk_size"], where=where)
        missing, width = result.missing, result.width
    if width is None:  # no batched forward ran: check the outputs against the targets as the estimators do
        output_width(where, problem, params, b.prepared)
    rows = []
    for name in names:
        shape = tuple(params[name].shape)
        why = missing.get(name)
        rows.append(Served(name, "taps", "", params[name].numel(), shape) if why is None else
                    Served(name, "generic", why, params[name].numel(), shape, CODES.get(why, why)))
    return Explanation(rows, opts["engine"])


__all__ = ["Explanation", "Served", "explain"]
