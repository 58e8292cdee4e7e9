"""The ``fedpriv`` command: ``simulate``, ``experiments``, ``audit``, ``certs``, ``deploy``.

Exit codes: 0 when a run completed (or stopped cleanly on a privacy budget), 2 for usage and configuration
errors (one line each, no traceback), 1 for a failed run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger("fedpriv")


class UsageError(Exception):
    """A command-line mistake; printed as one line per error, exit 2."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def parse_sets(items: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``["num-rounds=3", "lr=0.1"]`` → ``({"num-rounds": "3", "lr": "0.1"}, errors)``; values typed later."""
    out, errors = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"--set: expected key=value, got {item!r}")
            continue
        out[key.strip()] = value.strip()
    return out, errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpriv", description="Federated, privacy-preserving training on Flower.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("simulate", help="run a federated simulation locally",
                       description="Run a bundled experiment (or a TOML file) as a Flower simulation.")
    s.add_argument("experiment", nargs="?", default=None, help="bundled experiment name or .toml path "
                   "(default digits-fedavg; `fedpriv experiments` lists them)")
    s.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set num-rounds=3 partition=dirichlet dirichlet-alpha=0.1")
    s.add_argument("--out", default=None, help="run directory (default runs/<experiment>-<UTC timestamp>)")
    s.add_argument("--seed", type=int, default=None, help="shorthand for --set seed=N")
    s.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    s.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")

    a = sub.add_parser("audit", help="report ε per run, participant and mechanism from a privacy ledger",
                       description="Audit a run directory or a ledger file: ε(δ) per participant, the releases "
                                   "behind it, remaining budget, ε over rounds.")
    a.add_argument("path", help="run directory or ledger.sqlite")
    a.add_argument("--format", default="table", help="table (default), json or html")
    a.add_argument("--delta", type=float, default=None, help="δ of the reported ε (default: the runs' target-delta)")
    a.add_argument("--budget", type=float, default=None, help="ε budget per participant, to show what remains")
    a.add_argument("--accountant", default="rdp", help="rdp (default) or pld")
    a.add_argument("--empirical", action="store_true",
                   help="attack each run's mechanism and report a measured lower bound on ε beside the accounted ε")
    a.add_argument("--confidence", type=float, default=0.95, help="confidence of the empirical lower bound")
    a.add_argument("--trials", type=int, default=None, help="releases per side of the empirical distinguishing game")
    a.add_argument("--seed", type=int, default=0, help="seed of the empirical attack")

    e = sub.add_parser("experiments", help="list bundled experiments")
    e.add_argument("--keys", action="store_true", help="list every config key with its type and default")

    c = sub.add_parser("certs", help="make a CA, a SuperLink TLS certificate and SuperNode key pairs",
                       description="Write ca.crt/ca.key, server.pem/server.key (SuperLink TLS, the given hosts as "
                                   "subject alternative names) and nodes/node-<i>[.pub] (SuperNode authentication "
                                   "keys, EC P-384, OpenSSH format) into DIR. See README 'Deploy to devices'.")
    c.add_argument("dir", help="output directory")
    c.add_argument("--hosts", nargs="+", default=None, metavar="HOST",
                   help="addresses the SuperLink is reached at (default: 127.0.0.1 localhost)")
    c.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to write (default 0)")
    c.add_argument("--force", action="store_true", help="replace files already in DIR")

    d = sub.add_parser("deploy", help="run an experiment on a real SuperLink and SuperNodes",
                       description="Start a SuperLink and N SuperNodes on 127.0.0.1 with TLS and SuperNode "
                                   "authentication, run the experiment through them with `flwr run`, collect the "
                                   "run directory and stop everything started.")
    d.add_argument("target", choices=["local"], help="where to deploy (local: this machine, loopback only)")
    d.add_argument("experiment", nargs="?", default=None, help="bundled experiment name or .toml path")
    d.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (one client each)")
    d.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys")
    d.add_argument("--out", default=None, help="run directory (default runs/<experiment>-<UTC timestamp>)")
    d.add_argument("--seed", type=int, default=None, help="shorthand for --set seed=N")
    d.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (debugging only; prints a warning)")
    d.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take (default 3600)")
    d.add_argument("--keep", action="store_true", help="keep the node data files and Flower's app cache")
    return p


def cmd_experiments(args: argparse.Namespace) -> int:
    from server.config import describe_keys
    from simulations.experiments import list_experiments

    if args.keys:
        for key, typ, default, help_ in describe_keys():
            print(f"{key:<20} {typ:<6} {default!r:<16} {help_}")
        return EXIT_OK
    for name, description in list_experiments():
        print(f"{name:<24} {description}")
    return EXIT_OK


def _resolve_experiment(args: argparse.Namespace, overrides: dict[str, Any], errors: list[str]) -> Any:
    """The experiment's config with ``--set``/flag overrides and ``--out``; config errors join the CLI's own."""
    from server.config import ConfigError
    from simulations.experiments import resolve

    if args.out:
        overrides["out"] = args.out
    try:
        return resolve(args.experiment, overrides)
    except ConfigError as exc:
        raise UsageError(errors + exc.errors) from None


def _resolve_for_simulate(args: argparse.Namespace) -> tuple[Any, Path, bool]:
    from server.rundir import default_run_dir
    from simulations.experiments import resolve

    overrides, errors = parse_sets(args.sets)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UsageError([f"--resume: {run_dir} is not a run directory (no config.toml)"])
        import tomllib

        with open(run_dir / "config.toml", "rb") as f:
            saved = tomllib.load(f)
        if args.experiment or overrides or errors:
            raise UsageError(["--resume: give no experiment or --set; the run continues with its saved config"])
        cfg = resolve(overrides=saved)
        return cfg, run_dir, True
    cfg = _resolve_experiment(args, overrides, errors)
    if errors:
        raise UsageError(errors)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.experiment)
    return cfg, run_dir, False


def cmd_certs(args: argparse.Namespace) -> int:
    from simulations.certs import DEFAULT_HOSTS, check_hosts, make_certificates

    hosts = list(args.hosts) if args.hosts else list(DEFAULT_HOSTS)
    errors = check_hosts(hosts)
    if args.nodes < 0:
        errors.append(f"--nodes: expected a count >= 0, got {args.nodes}")
    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        errors.append(f"certs: {out} exists and is not a directory")
    elif not args.force and (existing := [n for n in ("ca.crt", "server.pem", "nodes") if (out / n).exists()]):
        errors.append(f"certs: {out} already holds {', '.join(existing)}; pass --force to replace them")
    if errors:
        raise UsageError(errors)
    made = make_certificates(out, hosts, args.nodes)
    print(f"fedpriv: CA {made.ca_cert} (keep {made.ca_key.name} off the devices)")
    print(f"fedpriv: SuperLink certificate {made.server_cert} + {made.server_key.name} for {', '.join(hosts)}")
    if made.nodes:
        print(f"fedpriv: {len(made.nodes)} SuperNode key pairs in {made.nodes[0].private.parent} "
              "(register the .pub files with `flwr supernode register`)")
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    from server.rundir import default_run_dir
    from simulations.deploy import INSECURE_WARNING, DeployError, deploy_local

    if args.insecure:
        print(f"fedpriv: {INSECURE_WARNING}", file=sys.stderr)
    overrides, errors = parse_sets(args.sets)
    if args.nodes < 1:
        errors.append(f"--nodes: expected at least 1 SuperNode, got {args.nodes}")
    if "num-clients" in overrides and str(overrides["num-clients"]) != str(args.nodes):
        errors.append(f"num-clients: deploy runs one client per SuperNode; got num-clients={overrides['num-clients']}"
                      f" with --nodes {args.nodes}")
    if args.timeout <= 0:
        errors.append(f"--timeout: expected seconds > 0, got {args.timeout:g}")
    if args.seed is not None:
        overrides["seed"] = args.seed
    overrides["num-clients"] = max(args.nodes, 1)
    cfg = _resolve_experiment(args, overrides, errors)
    if cfg.dataset == "words":
        errors.append("dataset: deploy local gives each SuperNode an image data file; 'words' (histograms) is "
                      "simulation-only")
    if errors:
        raise UsageError(errors)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.experiment)
    mode = "insecure" if args.insecure else "TLS, SuperNode authentication"
    print(f"fedpriv: deploying {cfg.experiment} on {args.nodes} local SuperNodes ({mode}) — {cfg.num_rounds} rounds, "
          f"{cfg.strategy} on {cfg.dataset} → {run_dir}", flush=True)
    try:
        summary = deploy_local(cfg, run_dir, args.nodes, insecure=args.insecure, timeout=args.timeout,
                               keep=args.keep, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"fedpriv: interrupted; every process started was stopped; what was recorded is in {run_dir}",
              file=sys.stderr)
        return EXIT_FAILED
    except DeployError as exc:
        print(f"fedpriv: deploy failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_outcome(summary, run_dir)
    return EXIT_OK


def _print_outcome(summary: dict[str, Any], run_dir: Path) -> None:
    """The last two lines of a finished run: why it stopped, the final figures and traffic, where it is."""
    from server.progress import describe_final, human_bytes

    traffic = (f", {human_bytes(summary['total_bytes_up'])} up, {human_bytes(summary['total_bytes_down'])} down"
               if "total_bytes_up" in summary else "")
    if (lora := summary.get("lora")) is not None:
        per_reply = lora.get("mean_bytes_up_per_client_round")
        print(f"fedpriv: federated LoRA: {lora['adapter_params']:,} adapter parameters travel "
              f"({100 * lora['adapter_share']:.1f}% of the {lora['base_params']:,}-parameter model)"
              + (f", {human_bytes(per_reply)} per client reply" if per_reply else "")
              + f"; base pretrained on {lora['public_examples']:,} public examples, test accuracy "
              f"{lora['base_test_accuracy']:.4f} before the adapters")
    print(f"fedpriv: {summary['stopped_reason']} after {summary['rounds_completed']} rounds in "
          f"{summary['wall_s']:.1f}s — {describe_final(summary)}{traffic}")
    print(f"fedpriv: run directory {run_dir}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.progress import LogReporter
    from simulations.runner import simulate

    cfg, run_dir, resume = _resolve_for_simulate(args)
    if sys.stderr.isatty():
        from simulations.progress import RichReporter

        reporter: Any = RichReporter()
    else:
        reporter = LogReporter()
    job = (f"{cfg.histogram_method}, {cfg.num_clients * cfg.users_per_client} users × {cfg.samples_per_user} samples"
           if cfg.strategy == "histogram" else f"{cfg.num_rounds} rounds")
    print(f"fedpriv: {cfg.experiment} — {cfg.num_clients} clients, {job}, {cfg.strategy} on {cfg.dataset} → "
          f"{run_dir}", flush=True)
    try:
        summary = simulate(cfg, run_dir, reporter=reporter, resume=resume, verbose=args.verbose)
    except KeyboardInterrupt:
        print(f"fedpriv: interrupted; what was recorded is in {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a failed run: one line, the details are in the log above
        print(f"fedpriv: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"fedpriv: partial results in {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    _print_outcome(summary, run_dir)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpriv`` console script."""
    from server.config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    from simulations.audit import AuditError, audit

    try:
        if args.command == "experiments":
            return cmd_experiments(args)
        if args.command == "audit":
            return audit(args.path, args.format, args.delta, args.budget, args.accountant, args.empirical,
                         args.confidence, args.trials, args.seed)
        if args.command == "certs":
            return cmd_certs(args)
        if args.command == "deploy":
            return cmd_deploy(args)
        return cmd_simulate(args)
    except (ConfigError, UsageError) as exc:
        for line in exc.errors:
            print(f"fedpriv: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except AuditError as exc:
        for line in str(exc).splitlines():
            print(f"fedpriv: error: {line}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
