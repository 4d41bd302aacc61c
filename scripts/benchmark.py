"""Measure seqlab's backbones and training path (implementation in seqlab.benchmark).

  python scripts/benchmark.py scan       # minGRU/minLSTM layer per scan method vs nn.GRU
  python scripts/benchmark.py lengths    # six backbones, tokens/s and memory vs T, JSON + plot
  python scripts/benchmark.py decode     # six encoder-decoders generating T tokens one at a time
  python scripts/benchmark.py overhead   # seqlab's Trainer path vs a plain PyTorch loop
  python scripts/benchmark.py ablation   # the same, taking one part of the Trainer path away at a time
  python scripts/benchmark.py data       # share of step time waiting for data, per task
  python scripts/benchmark.py startup    # python train.py to its first optimizer step
  python scripts/benchmark.py all

Results go to --out (default logs/benchmarks/<time>) as <name>.json (with date, hardware and
versions) and, for lengths, lengths.png. Record what you publish in benchmarks/RESULTS.md.
"""

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from seqlab import benchmark as bench
from seqlab.errors import SeqlabError
from seqlab.utils.run import print_table

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("scan", "lengths", "decode", "overhead", "ablation", "data", "startup")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def words(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (median); overhead: pairs of runs (default 10), ablation: "
        "rounds of all variants (default 6; a 95%% interval needs >= 6)",
    )
    parser.add_argument(
        "--lengths",
        type=ints,
        default=None,
        help="comma-separated sequence lengths (decode: tokens generated)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=128, help="lengths: d_model; scan: hidden width")
    parser.add_argument("--d-in", type=int, default=64, help="scan: input width")
    parser.add_argument("--layers", type=int, default=1, help="lengths, decode: layers per backbone")
    parser.add_argument("--source-length", type=int, default=64, help="decode: the encoded source's length")
    parser.add_argument("--backbones", type=words, default=list(bench.BACKBONES))
    parser.add_argument(
        "--methods", type=words, default=["sequential", "blocked", "log"], help="scan methods"
    )
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="lengths: autocast dtype")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="scan, lengths on a GPU: cuDNN and matmuls both at TF32 (default: both float32)",
    )
    parser.add_argument("--compile", action="store_true", help="lengths: torch.compile each block")
    parser.add_argument("--tbptt", type=int, default=None, help="lengths: model.tbptt_steps for rnn/lstm/gru")
    parser.add_argument(
        "--with-baseline", action="store_true",
        help="lengths with --compile/--tbptt: the plain backbones timed in the same rounds (paired *_speedup)",
    )  # fmt: skip
    parser.add_argument("--max-step-seconds", type=float, default=30.0)
    parser.add_argument("--epochs", type=int, default=2, help="overhead/ablation: epochs per repeat")
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=None,
        help="overhead/ablation/startup: train.py overrides (replace the defaults); data: added after "
        "its defaults, and data=X benchmarks that data alone",
    )
    return parser.parse_args(argv)


#: the train.py overrides each Trainer-path command runs with when --overrides is not given
TRAINER_DEFAULTS = {
    "overhead": bench.OVERHEAD_OVERRIDES,
    "ablation": bench.OVERHEAD_OVERRIDES,
    "data": bench.DATA_COMMON,
    "startup": bench.STARTUP_OVERRIDES,
}


def run(command: str, args: argparse.Namespace, out: Path) -> None:
    overrides = args.overrides if args.overrides is not None else TRAINER_DEFAULTS.get(command, ())
    if command == "data":
        overrides = [*bench.DATA_COMMON, *(args.overrides or ())]
    # scan and lengths time their layers on --device; the others train as train.py does
    device = bench.trainer_device(overrides) if command in TRAINER_DEFAULTS else torch.device(args.device)
    meta = {"command": command, "environment": bench.environment(device)}
    if command == "scan":
        rows = bench.bench_scan(
            lengths=args.lengths or (256, 1024, 2048), batch=args.batch, d_in=args.d_in, hidden=args.width,
            methods=args.methods, repeats=args.repeats or 5, device=args.device, tf32=args.tf32,
        )  # fmt: skip
        print_table(shown(rows), f"training step, B={args.batch}, d_in={args.d_in}, hidden={args.width}")
        meta["warnings"] = warn(bench.timing_warnings(rows))
        if device.type == "cuda":  # the switches the scan ran with, not those at start
            meta["environment"].update(bench.float32_switches(args.tf32))
        payload = {**meta, "batch": args.batch, "d_in": args.d_in, "hidden": args.width, "rows": rows}
    elif command == "lengths":
        default = bench.GPU_LENGTHS if device.type == "cuda" else bench.CPU_LENGTHS
        settings = {"batch": args.batch, "width": args.width, "layers": args.layers, "amp": args.amp,
                    "compile": args.compile, "tbptt": args.tbptt, "with_baseline": args.with_baseline}  # fmt: skip
        partial = out / "lengths.partial.json"  # the rows so far, should a later backbone fail

        def progress(rows_so_far: list) -> None:
            bench.write_json(partial, {**meta, **settings, "rows": rows_so_far})

        rows = bench.bench_lengths(
            backbones=args.backbones, lengths=args.lengths or default, batch=args.batch, width=args.width,
            num_layers=args.layers, repeats=args.repeats or 3, device=args.device, amp=args.amp,
            max_step_seconds=args.max_step_seconds, compile=args.compile, tbptt=args.tbptt,
            with_baseline=args.with_baseline, tf32=args.tf32, progress=progress,
        )  # fmt: skip
        partial.unlink(missing_ok=True)
        if device.type == "cuda":  # the switches the lengths ran with, not those at start
            meta["environment"].update(bench.float32_switches(args.tf32))
        spans: dict[str, list[int]] = {}  # the lengths each training exponent was fitted over
        fitted = {"train": bench.exponents(rows, "train_ms", spans=spans), "inference": bench.exponents(rows, "infer_ms"),
                  "train_above_fixed": bench.exponents(rows, "train_ms", above_fixed_cost=True),
                  "inference_above_fixed": bench.exponents(rows, "infer_ms", above_fixed_cost=True)}  # fmt: skip
        print_table(shown(rows), f"{args.device}, B={args.batch}, width={args.width}, layers={args.layers}")
        print_table([{"backbone": k, **{p: fitted[p].get(k) for p in fitted}} for k in fitted["train"]],
                    "scaling exponent of time in T (upper half of the lengths; *_above_fixed: of the "
                    "time above the fixed cost, the T=0 intercept of the two shortest lengths' line)")  # fmt: skip
        title = f"{meta['environment']['device_name'] or args.device}: B={args.batch}, width {args.width}"
        print(f"wrote {bench.plot_lengths(rows, out / 'lengths.png', title)}")
        payload = {**meta, **settings, "scaling_exponents": fitted, "exponent_lengths": spans, "rows": rows}
        inference = {f"{name} (inference)": value for name, value in fitted["inference"].items()}
        payload["warnings"] = warn(bench.timing_warnings(rows, {**fitted["train"], **inference}))
    elif command == "decode":
        settings = {
            "batch": args.batch,
            "width": args.width,
            "layers": args.layers,
            "source_length": args.source_length,
        }
        rows = bench.bench_decode(
            backbones=args.backbones, lengths=args.lengths or (16, 64, 256, 1024), source_length=args.source_length,
            batch=args.batch, width=args.width, num_layers=args.layers, repeats=args.repeats or 3, device=args.device,
        )  # fmt: skip
        print_table(
            shown(rows),
            f"generation, one token at a time: {args.device}, B={args.batch}, width={args.width} "
            "(per_token_vs_shortest: the median over the rounds of each round's ratio to the shortest "
            "length, paired; under noise it can disagree with the ratio of the ms_per_token medians)",
        )
        payload = {**meta, **settings, "rows": rows, "warnings": warn(bench.timing_warnings(rows))}
    elif command == "overhead":
        result = bench.bench_overhead(
            overrides=overrides,
            epochs=args.epochs,
            repeats=args.repeats or 10,
        )
        print_table(
            [{k: v for k, v in result.items() if not isinstance(v, list)}], "Trainer path vs plain loop"
        )
        payload = {**meta, **result}
    elif command == "ablation":
        rows = bench.bench_ablation(
            overrides=overrides,
            epochs=args.epochs,
            repeats=args.repeats or 6,
        )
        print_table([{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows],
                    "what each part of the Trainer path costs (ms per step)")  # fmt: skip
        payload = {**meta, "overrides": list(overrides), "rows": rows}
    elif command == "data":  # --overrides come after the defaults (data=X: that data alone)
        rows = bench.bench_data(extra=args.overrides or (), epochs=args.epochs, repeats=args.repeats or 1)
        print_table(rows, "share of the training step waiting for data (plain loop)")
        payload = {**meta, "overrides": list(overrides), "rows": rows}  # (which model: the command's)
    else:
        result = bench.bench_startup(overrides=overrides, repeats=args.repeats or 3)
        print_table([{k: v for k, v in result.items() if not isinstance(v, list)}], "start-up")
        payload = {**meta, **result}
    path = bench.write_json(out / f"{command}.json", payload)
    print(f"wrote {path}")


def warn(found: list[str]) -> list[str]:
    """Print what says the machine was busy (``bench.timing_warnings``); kept in the JSON too."""
    if found:
        print(
            "warning: these figures measured a busy machine, not the backbones (run again on an idle "
            "one, e.g. OMP_NUM_THREADS=1 with nothing else running):\n  " + "\n  ".join(found),
            file=sys.stderr,
        )
    return found


def shown(rows: list[dict]) -> list[dict]:
    """Rows as printed: every repeat's times (lists) are in the JSON only."""
    return [{key: value for key, value in row.items() if not isinstance(value, list)} for row in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or ROOT / "logs" / "benchmarks" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        for command in COMMANDS if args.command == "all" else (args.command,):
            run(command, args, out)
    except SeqlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
