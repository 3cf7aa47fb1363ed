"""The ``hvjit`` command's entry point (``python -m hvjit``, the ``hvjit`` script).

A run for a warm server (``--server``, $HVJIT_SERVER) is sent there with the standard library
alone, before :mod:`hvjit.cli` (argparse, pathlib, typing, ...) is imported; everything else
is :func:`hvjit.cli.run_command` in this process.
"""

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        from .serve_client import run_if_served, wants_server

        if wants_server(argv):
            status, argv = run_if_served(argv)
            if status is not None:
                return status
    from .cli import run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
