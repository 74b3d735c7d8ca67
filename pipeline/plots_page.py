"""``dvc plots show`` offline: the page it fills, with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads those three libraries from a CDN, so without internet it is blank. ``.dvc/config`` points
``plots.html_template`` at ``.dvc/plots/offline.html``, which this module writes (``make install`` runs it) from the
JavaScript bundle of ``vl-convert-python``: one self-contained ``<script>``, no network. The page has DVC's
``{plot_divs}`` placeholder and no ``{scripts}`` one, so DVC adds no CDN tags.

    python -m pipeline.plots_page             # writes .dvc/plots/offline.html of the project in the current directory
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

VEGA_LITE = "v5.21"  # the schema version of DVC's templates and of .dvc/plots/by_scale.json
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>sCM study: dvc plots</title>
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The HTML template: DVC's placeholders around the inlined libraries."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "{plot_divs}" in bundle or "{scripts}" in bundle:  # DVC would substitute inside the script
        raise RuntimeError("the Vega bundle contains a DVC template placeholder")
    return PAGE.replace("{bundle}", bundle)


def write(project: Path) -> Path:
    """Write ``<project>/.dvc/plots/offline.html`` atomically; return its path."""
    path = Path(project) / ".dvc" / "plots" / "offline.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(page(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plots_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the DVC project (default: the current directory)")
    args = parser.parse_args(argv)
    print(f"wrote {write(args.project)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
