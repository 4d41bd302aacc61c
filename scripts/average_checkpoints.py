"""Average the checkpoints of one run into one (fairseq's average_checkpoints.py):
`python scripts/average_checkpoints.py <run dir> --last 5 --output avg.ckpt` averages the run's last
5 epoch checkpoints (kept with callbacks.recent_checkpoints.save_top_k=5); checkpoint files and sharded
checkpoint directories can be given as well. Then: python eval.py ckpt_path=avg.ckpt (see seqlab.average)."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seqlab.average import average_checkpoints
from seqlab.errors import SeqlabError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        metavar="checkpoint",
        help="checkpoint files, sharded checkpoint directories, or run directories (their epoch_NNN.ckpt)",
    )
    parser.add_argument("--output", type=Path, required=True, help="the averaged checkpoint to write")
    parser.add_argument(
        "--last", type=int, default=None, help="average the latest N checkpoints only (by epoch and step)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        average_checkpoints(args.inputs, args.output, args.last)
    except SeqlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
