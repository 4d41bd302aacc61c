"""Compare the backbones of a sweep: `python scripts/compare.py <sweep dir>` writes report.md,
report.csv and the plots into that directory (see seqlab.compare)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seqlab.compare import compare
from seqlab.errors import SeqlabError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (logs/<task>/multiruns/<time>)")
    args = parser.parse_args()
    try:
        report = compare(args.sweep_dir)
    except SeqlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
