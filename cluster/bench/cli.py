"""The `alexnet-pp bench` dispatcher: `bench NAME ARGS` runs that benchmark's `main(ARGS)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional, Sequence

from cluster.bench import BENCHMARKS
from cluster.bench.report import REPO_ROOT


def usage() -> str:
    lines = ["usage: alexnet-pp bench {" + ",".join(BENCHMARKS) + "} [ARGS]  (alexnet-pp bench NAME --help)", ""]
    lines += [f"  {name:<11} {text}" for name, (_, text) in BENCHMARKS.items()]
    lines += ["", "Each writes NAME.json, NAME.csv and NAME.md under --out (default runs/bench/NAME)."]
    return "\n".join(lines)


def load(name: str) -> Optional[Any]:
    """The benchmark's module, or None (with a message) when this installation lacks it. `benchmarks/`
    is not an installed package: in a checkout it is found beside the `cluster` package."""
    module = BENCHMARKS[name][0]
    if module.startswith("benchmarks.") and (REPO_ROOT / "benchmarks").is_dir() and str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            print(f"alexnet-pp bench {name}: not available here: {module} is not installed with this copy of "
                  f"alexnet-pp ({module.replace('.', '/')}.py is missing; run from a checkout that has it)",
                  file=sys.stderr)
            return None
        raise


def main_bench(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"alexnet-pp bench: unknown benchmark {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = load(name)
    if module is None:
        return 2
    if module.__name__.startswith("cluster.bench."):
        return int(module.main(rest) or 0)
    return _run_foreign(name, module, rest)


def _run_foreign(name: str, module: Any, argv: list[str]) -> int:
    """A benchmark written outside this package: its `main(argv)` returns an exit code or its results
    (a dict); results are written in the common format under --out."""
    from cluster.bench.report import Column, Report, Table, add_out_arg, rows_from_result

    ap = argparse.ArgumentParser(add_help=False)
    add_out_arg(ap, name)
    known, rest = ap.parse_known_args(argv)
    result = module.main(rest)
    if result is None or isinstance(result, int):
        return int(result or 0)
    rows, settings = rows_from_result(result)
    report = Report(name, known.out, argv, settings, rows=rows)
    for kind in dict.fromkeys(r.get("kind") for r in rows):  # a table per kind of row, in order
        group = [r for r in rows if r.get("kind") == kind]
        keys = [k for k in dict.fromkeys(k for r in group for k in r) if k != "kind"]
        report.tables.append(Table(kind or name, group, [Column(k.replace("_", " "), k) for k in keys]))
    for path in report.write():
        print(f"wrote {path}")
    return 0
