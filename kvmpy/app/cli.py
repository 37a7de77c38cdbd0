"""The ``kvmpy`` command line.

Bad input (an option, a KVMPY_* variable, a device that is not KVM, an unwritable report path)
gets one line on stderr naming what is wrong and the valid choices, and exit 2, before anything
runs: never a traceback (docs/design.md, "Failure behaviour").
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from ..errors import KvmError, KvmUnavailable

EXIT_USAGE = 2


def _fail(prog: str, message: str) -> NoReturn:
    # One line whatever the message: a multi-line one would break "one line on stderr".
    print(f"{prog}: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage and then the error; one line naming the problem (argparse's
    messages list the valid choices) and where to find the rest is easier to read in a log."""

    def error(self, message: str) -> NoReturn:
        _fail(self.prog, f"{message} (see {self.prog} --help)")


def _backend(name: str):  # type: ignore[no-untyped-def]
    from ..backend.select import make_backend

    return make_backend(name)


def cmd_caps(args: argparse.Namespace) -> int:
    from ..caps import probe
    from .render_caps import render

    try:
        report = probe(_backend(args.backend))
    except (KvmUnavailable, KvmError, OSError, ValueError, NotImplementedError) as e:
        # KvmError: a device that opens but answers like no KVM (ENOTTY from /dev/null).
        _fail("kvmpy caps", str(e))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render(report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    return run(args)


def _check(args: argparse.Namespace) -> None:
    """Everything the command will read, validated before it starts (one line, exit 2)."""
    from ..backend.select import ConfigError, check_environment

    try:
        check_environment()
        if args.cmd == "run":
            from .run import check_args

            check_args(args)
    except ConfigError as e:
        _fail(f"kvmpy {args.cmd}", str(e))


def cmd_vm(argv: list[str]) -> int:
    """``kvmpy vm``: its own parser (kvmpy/app/vm.py, shared with ci/vm-run)."""
    from ..backend.select import ConfigError, check_environment
    from .vm import main as vm_main

    try:
        check_environment()  # the guest's kvmpy run reads the same KVMPY_* variables
    except ConfigError as e:
        _fail("kvmpy vm", str(e))
    return vm_main(argv, prog="kvmpy vm")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["vm"]:
        return cmd_vm(args_in[1:])
    p = _Parser(prog="kvmpy", description="KVM guest_memfd / private memory test harness")
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
    # Listed for --help; `kvmpy vm ...` is dispatched above, before this parser.
    sub.add_parser("vm", add_help=False,
                   help="boot a kernel under test in QEMU and run the suite in it "
                        "(kvmpy vm --help)")
    args, extra = p.parse_known_args(args_in)
    if args.cmd == "run":
        args.pytest_args = extra
    elif extra:
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    _check(args)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
