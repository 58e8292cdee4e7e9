"""A terminal progress bar (rounds, and clients done in the current round) for ``fedpriv simulate``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.progress import human_bytes


class RichReporter:
    """Two bars: rounds of the run, and clients that replied in the current round."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console, transient=False,
        )

    def start(self, num_rounds: int, first_round: int) -> None:
        self.progress.start()
        self.rounds = self.progress.add_task("rounds", total=num_rounds, completed=first_round - 1, info="")
        self.clients = self.progress.add_task("clients", total=1, completed=0, info="")

    def round_start(self, server_round: int, num_clients: int) -> None:
        self.progress.update(self.clients, total=max(num_clients, 1), completed=0,
                             description=f"round {server_round}")

    def client_done(self, server_round: int) -> None:
        self.progress.advance(self.clients)

    def round_end(self, row: dict[str, Any]) -> None:
        info = (f"acc {row['test_accuracy']:.3f}  loss {row['test_loss']:.3f}  "
                f"↑{human_bytes(row['bytes_up'])} ↓{human_bytes(row['bytes_down'])}")
        self.progress.update(self.rounds, advance=1, info=info)

    def finish(self, summary: dict[str, Any]) -> None:
        self.progress.stop()
