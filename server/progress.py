"""Progress reporting from the round loop: a protocol, and the plain-log implementation."""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger("fedpriv")


class Reporter(Protocol):
    """Receives progress events from :func:`server.loop.run_rounds`."""

    def start(self, num_rounds: int, first_round: int) -> None: ...
    def round_start(self, server_round: int, num_clients: int) -> None: ...
    def client_done(self, server_round: int) -> None: ...
    def round_end(self, row: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class LogReporter:
    """One plain log line per round (for logs, CI and `flwr run`)."""

    def start(self, num_rounds: int, first_round: int) -> None:
        self.num_rounds = num_rounds
        logger.info("%d rounds, starting at round %d", num_rounds, first_round)

    def round_start(self, server_round: int, num_clients: int) -> None:
        pass

    def client_done(self, server_round: int) -> None:
        pass

    def round_end(self, row: dict[str, Any]) -> None:
        logger.info(
            "round %d/%d: test_accuracy=%.4f test_loss=%.4f clients=%d rejected=%d up=%s down=%s %.1fs",
            row["round"], self.num_rounds, row["test_accuracy"], row["test_loss"], row["clients"],
            row["rejected"], human_bytes(row["bytes_up"]), human_bytes(row["bytes_down"]), row["wall_s"],
        )

    def finish(self, summary: dict[str, Any]) -> None:
        logger.info("%s after %d rounds, %s", summary["stopped_reason"], summary["rounds_completed"],
                    describe_final(summary))


def describe_final(summary: dict[str, Any]) -> str:
    """The run's final figure in words: test accuracy and loss, or a histogram's ℓ1 error."""
    final = summary["final"]
    if "l1_error" in final:
        return f"final l1 error {final['l1_error']:.4f} over {summary.get('users', 0)} users"
    return f"final test accuracy {final['test_accuracy']:.4f} (loss {final['test_loss']:.4f})"


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
