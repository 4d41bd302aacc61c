"""Compare the backbones of a sweep: `python scripts/compare.py <sweep dir>` writes report.md,
report.csv and the plots into that directory; `python scripts/compare.py <dir> <dir> ... --out <dir>`
compares the jobs of several sweeps and runs together and writes into --out (see seqlab.compare)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seqlab.compare import compare
from seqlab.errors import SeqlabError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "dirs",
        type=Path,
        nargs="+",
        metavar="dir",
        help="a multirun directory (logs/<task>/multiruns/<time>); several: sweeps and single runs "
        "(logs/<task>/runs/<time>) compared as one sweep",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the report goes (needed with several directories)"
    )
    args = parser.parse_args()
    try:
        report = compare(args.dirs[0] if len(args.dirs) == 1 else args.dirs, out=args.out)
    except SeqlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
