"""The ``kvmpy`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import KvmUnavailable


def _backend(name: str):  # type: ignore[no-untyped-def]
    from .backend.select import make_backend

    return make_backend(name)


def cmd_caps(args: argparse.Namespace) -> int:
    from .caps import probe, render

    try:
        report = probe(_backend(args.backend))
    except KvmUnavailable as e:
        print(f"kvmpy caps: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render(report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvmpy", description="KVM guest_memfd / private memory "
                                "test harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("caps", help="show the capabilities KVM offers and what they enable")
    c.add_argument("--json", action="store_true", help="print a JSON object")
    c.add_argument("--backend", default="kvm", choices=["kvm", "emu"],
                   help="real KVM (default) or the emulated KVM")
    c.set_defaults(func=cmd_caps)
    r = sub.add_parser("run", allow_abbrev=False,
                       help="run the selftests (pytest + xdist) with a header, progress and "
                            "summary; JUnit/KTAP; kselftest exit codes",
                       usage="kvmpy run [--backend B] [--junit PATH] [--ktap PATH] "
                             "[--timeout S] [-n N] [pytest args...]",
                       epilog="Exit: 0 pass, 1 fail, 4 all skipped, 5 no tests, 2 error. "
                              "Plain pytest equivalents: docs/running.md")
    from .run import add_arguments

    add_arguments(r)
    r.set_defaults(func=cmd_run)
    args, extra = p.parse_known_args(argv)
    if args.cmd == "run":
        args.pytest_args = extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
