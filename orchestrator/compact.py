"""`python -m orchestrator.compact OUT` — merge OUT/runs/<run_id>.parquet into a few compacted files.

A sweep compacts by itself at its end once it has store.COMPACT_AT per-run files; this command does
it at any count, e.g. after copying results together or while a long sweep still runs (safe: no
row written meanwhile is lost or counted twice; see store.compact).
"""

import argparse
import sys

from orchestrator import lease, store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.compact", description=__doc__.split("\n\n")[1])
    p.add_argument("out", help="results folder or s3://bucket/prefix")
    args = p.parse_args(argv)
    fs, root = store.resolve(store.absolute(args.out))
    if not store.exists(fs, f"{root}/runs"):
        print(f"error: out: {args.out} has no runs/ folder; give the OUT of a sweep", file=sys.stderr)
        return 2
    try:
        with lease.held(args.out):
            merged = store.compact(store.absolute(args.out))
    except lease.LeaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"compacted {merged} run files under {args.out}/runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
