"""The ``vitq`` command: ``vitq sweep ...`` is ``python -m vitq.sweep ...``; likewise ``report``, ``sensitivity``,
``compare`` and ``bench``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"sweep": "vitq.sweep", "report": "vitq.report", "sensitivity": "vitq.search.sensitivity",
            "compare": "vitq.search.compare", "bench": "vitq.bench"}
USAGE = ("usage: vitq {" + ",".join(COMMANDS) + "} [ARGS...]   (vitq COMMAND --help for a command's arguments; "
         "vitq --version)")


def version() -> str:
    """vitq's version and those of the libraries its numbers depend on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from vitq import __version__

    parts = []
    for dist in ("torch", "timm", "optuna", "mlflow", "hydra-core"):
        try:
            parts.append(f"{dist} {installed(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return f"vitq {__version__} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"vitq: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    if name == "sweep":  # a Hydra app: it reads sys.argv itself (and names its job after the program)
        sys.argv = [f"vitq {name}", *rest]
        module.cli()
        return 0
    return int(module.main(rest, prog=f"vitq {name}") or 0)


if __name__ == "__main__":
    raise SystemExit(main())
