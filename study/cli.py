"""What every stage's command line shares: the params arguments, the training arguments, and the exit-code wrapper.

Every stage module has the same shape: one typed ``run(...) -> dict`` that does the work and a thin ``main()`` that
parses arguments and calls it through :func:`cli`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from study.errors import StageError
from study.params import Params, load, selection


def add_params_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every stage CLI shares: --params, --profile, -S key=value, --dry-run."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="profile under profiles: (default: the file's profile key)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. -S distill.steps=500 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved parameters and exit")
    parser.set_defaults(stage_name=parser.prog.split()[-1].rsplit(".", 1)[-1])  # "python -m stages.encode" -> encode


def load_args(args: argparse.Namespace) -> Params:
    """Load params from parsed :func:`add_params_args` arguments; with --dry-run print them and exit (resolved for
    ``--scale`` where the stage has one: the per-scale values become that scale's)."""
    params = load(args.params, args.profile, args.overrides)
    if getattr(args, "dry_run", False):
        shown = params.at(args.scale) if getattr(args, "scale", None) else params
        print(yaml.safe_dump(shown.to_dict(), sort_keys=False), end="")
        raise SystemExit(0)
    print(f"{args.stage_name}: {selection(args.params, params, args.overrides)}", flush=True)  # every stage's first line
    return params


def add_training_args(parser: argparse.ArgumentParser, scales: Any) -> None:
    """The arguments the teacher and distill CLIs share (besides the params arguments)."""
    parser.add_argument("--scale", required=True, help=f"model scale ({', '.join(scales)})")
    parser.add_argument("--latents", type=Path, default=Path("data/latents"), help="encode stage output")
    parser.add_argument("--out", type=Path, required=True, help="output directory, replaced whole on success")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--history", type=Path, required=True, help="training-curve CSV to write")


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a stage's ``main``: user errors become one line on stderr and exit code 2."""
    try:
        main(argv)
    except StageError as e:  # one line, even when a path in it holds a newline
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse errors (2), --help and --dry-run (0)
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: keep the traceback, it is a bug
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr)
        return 1
    print(f"{Path(sys.argv[0]).stem}: peak memory {peak_rss_mib():.0f} MiB", file=sys.stderr)
    return 0


def one_line(text: str) -> str:
    """``text`` on one line: line breaks shown as ``\\n``, so that nothing can forge a second ``error:`` line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux/macOS ``ru_maxrss``)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
