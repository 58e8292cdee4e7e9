"""``fedpriv audit``: render the ledger's privacy report as a table (rich), JSON or a self-contained HTML page.

Everything shown is recomputed from the ledger file alone (:func:`privacy.report.build_report`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

FORMATS = ("table", "json", "html")


class AuditError(Exception):
    """A bad audit request; one line, exit 2."""


def find_ledger(path: Path) -> Path:
    """The ledger of a run directory (its own, or the shared one its summary names), or ``path`` itself."""
    if path.is_dir():
        own = path / "ledger.sqlite"
        if own.is_file():
            return own
        summary = path / "summary.json"
        if summary.is_file():
            shared = json.loads(summary.read_text()).get("privacy", {}).get("ledger")
            if shared and Path(shared).is_file():
                return Path(shared)
        raise AuditError(f"{path} holds no privacy ledger (ledger.sqlite): was the run differentially private?")
    if not path.exists():
        raise AuditError(f"no run directory or ledger at {path}")
    return path


def run_filter(path: Path) -> str | None:
    """Audit only the run of a run directory; a ledger file is audited whole."""
    return path.resolve().name if path.is_dir() else None


def _fmt(x: float | None) -> str:
    return "∞" if x is None else f"{x:.4g}"


def render_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Privacy ledger[/] {report['ledger']}  (δ = {report['delta']:g}, {report['accountant']} "
                  "accountant; pending releases are counted as spent)")
    if not report["runs"]:
        console.print("no runs recorded")
    for run in report["runs"]:
        for unit, rows in run["units"].items():
            table = Table(title=f"{run['run_id']} — {run['experiment']} — unit: {unit}", title_justify="left")
            for col in ("participant", "ε (run)", "ε (all runs)", "releases", "pending", "rounds", "mechanisms"):
                table.add_column(col, justify="left" if col in ("participant", "mechanisms") else "right")
            if report["budget_epsilon"] is not None:
                table.add_column("remaining", justify="right")
            for r in rows:
                rounds = r["rounds"]
                cells = [r["participant"], _fmt(r["epsilon"]), _fmt(r["epsilon_all_runs"]), str(r["releases"]),
                         str(r["pending"]), f"{rounds[0]}–{rounds[-1]}" if rounds else "-",
                         ", ".join(f"{k}×{v}" for k, v in r["mechanisms"].items())]
                if report["budget_epsilon"] is not None:
                    cells.append(_fmt(r["remaining"]))
                table.add_row(*cells)
            console.print(table)


def _plot_png(report: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in report["runs"]:
        for unit, rows in run["units"].items():
            for r in rows:
                pts = [(rnd, e) for rnd, e in r["epsilon_by_round"] if e is not None]
                if pts:
                    label = f"{run['run_id'][-20:]} {r['participant']} ({unit})"
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    if report["budget_epsilon"] is not None:
        ax.axhline(report["budget_epsilon"], color="tab:red", linestyle="--", label="budget")
    ax.set(xlabel="round", ylabel=f"ε at δ={report['delta']:g}", title="ε over rounds")
    handles, _ = ax.get_legend_handles_labels()
    if 0 < len(handles) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedpriv privacy audit</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "caption{text-align:left;font-weight:bold;margin-bottom:4px}</style></head><body>",
        "<h1>Privacy audit</h1>",
        f"<p>Ledger <code>{esc(report['ledger'])}</code>; ε at δ = {report['delta']:g} with the "
        f"{esc(report['accountant'])} accountant. Pending releases are counted as spent.</p>",
        f"<img alt='epsilon over rounds' src='data:image/png;base64,{_plot_png(report)}'>",
    ]
    for run in report["runs"]:
        for unit, rows in run["units"].items():
            head = ["participant", "ε (run)", "ε (all runs)", "releases", "pending", "rounds", "mechanisms"]
            if report["budget_epsilon"] is not None:
                head.append("remaining")
            parts.append(f"<table><caption>{esc(run['run_id'])} — {esc(run['experiment'])} — unit: {esc(unit)}"
                         "</caption><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
            for r in rows:
                cells = [r["participant"], _fmt(r["epsilon"]), _fmt(r["epsilon_all_runs"]), r["releases"],
                         r["pending"], ", ".join(map(str, r["rounds"])),
                         ", ".join(f"{k}×{v}" for k, v in r["mechanisms"].items())]
                if report["budget_epsilon"] is not None:
                    cells.append(_fmt(r["remaining"]))
                parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_empirical(results: list, fmt: str) -> None:
    """Accounted ε beside the measured lower bound, one row per audited run."""
    from simulations.empirical import results_json

    if fmt == "json":
        print(results_json(results))
        return
    head = ["run", "mechanism", "participant", "accounted ε", "empirical ε lower bound", "confidence", "attack"]
    rows = [[r.run_id, r.mechanism, f"{r.participant} ({r.unit})", f"{r.accounted_epsilon:.4g}",
             f"{r.epsilon_lb:.4g}" + ("  VIOLATION" if r.violation else ""), f"{r.confidence:.0%}", r.attack]
            for r in results]
    if fmt == "html":
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        print(f"<!doctype html><meta charset='utf-8'><title>fedpriv empirical audit</title><h1>Empirical privacy "
              f"audit</h1><p>δ = {results[0].delta:g}. A lower bound above the accounted ε proves a privacy bug; "
              "one below it only means this attack found none.</p><table border=1><tr>"
              + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Empirical privacy audit (δ = {results[0].delta:g}; lower bounds hold with the stated "
                  "confidence)", title_justify="left")
    for h in head:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def audit(path: str, fmt: str = "table", delta: float | None = None, budget: float | None = None,
          accountant: str = "rdp", empirical: bool = False, confidence: float = 0.95, trials: int | None = None,
          seed: int = 0) -> int:
    """Print the audit of ``path`` (a run directory or a ledger file) in ``fmt``; raises AuditError.

    ``empirical``: instead of the ledger's report, attack each run's mechanism (:mod:`simulations.empirical`)
    and print the measured lower bound on ε beside the accounted ε.
    """
    from privacy.ledger import Ledger, LedgerError
    from privacy.report import build_report

    errors = []
    if fmt not in FORMATS:
        errors.append(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if delta is not None and not (math.isfinite(delta) and 0.0 < delta < 1.0):
        errors.append(f"--delta: expected a value > 0 and < 1, got {delta!r}")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        errors.append(f"--budget: expected a value > 0, got {budget!r}")
    if accountant not in ("rdp", "pld"):
        errors.append(f"--accountant: expected one of rdp, pld, got {accountant!r}")
    if not (math.isfinite(confidence) and 0.0 < confidence < 1.0):
        errors.append(f"--confidence: expected a value > 0 and < 1, got {confidence!r}")
    if trials is not None and trials < 2:
        errors.append(f"--trials: expected an integer ≥ 2, got {trials!r}")
    if errors:
        raise AuditError("\n".join(errors))
    target = Path(path)
    ledger_path = find_ledger(target)
    try:
        ledger = Ledger(ledger_path, create=False)
    except LedgerError as exc:
        raise AuditError(str(exc)) from None
    with ledger:
        if delta is None:  # the δ the runs were configured with, when they agree
            deltas = {r["config"].get("target-delta") for r in ledger.runs()} - {None}
            delta = deltas.pop() if len(deltas) == 1 else 1e-5
        run_id = run_filter(target) if ledger_path.parent == target else None
        if empirical:
            from simulations.empirical import EmpiricalAuditError, empirical_audit

            try:
                results = empirical_audit(ledger, run_id, delta=delta, confidence=confidence, trials=trials,
                                          seed=seed, accountant=accountant)
            except EmpiricalAuditError as exc:
                raise AuditError(str(exc)) from None
            render_empirical(results, fmt)
            return 0
        report = build_report(ledger, delta, budget_epsilon=budget, accountant=accountant, run_id=run_id)
    if fmt == "json":
        print(json.dumps(report, indent=2))
    elif fmt == "html":
        print(render_html(report))
    else:
        render_table(report)
    return 0
