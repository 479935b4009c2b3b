"""``python -m theory [--only PATTERN] [--list]``: run every registered theorem check."""

from __future__ import annotations

import argparse
import sys

from theory import registry


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m theory", description=__doc__)
  parser.add_argument("--only", default=None,
                      help="run only checks whose name contains this text (e.g. 'meta')")
  parser.add_argument("--list", action="store_true", help="list the checks without running")
  parser.add_argument("--index", action="store_true",
                      help="print the Markdown index of the checks (theory/README.md) and exit")
  args = parser.parse_args(argv)
  if args.index:
    print(registry.markdown_index(args.only), end="")
    return 0

  selected = registry.checks(args.only)
  if not selected:
    print(f"no theory check matches {args.only!r}", file=sys.stderr)
    return 2
  if args.list:
    for c in selected:
      print(f"{c.name:50s} {c.source}")
    return 0

  header = f"{'check':48s} {'source':34s} {'measured':>11s} {'':2s} {'tolerance':>10s}  result"
  print(header)
  print("-" * len(header))
  failed = 0
  total_time = 0.0
  for c in selected:
    try:
      res, secs = registry.run_check(c)
      ok = res.passed
      rel = "<=" if res.mode == "max" else ">="
      line = (f"{c.name:48s} {c.source[:34]:34s} {res.measured:11.3e} {rel:2s} "
              f"{res.tolerance:10.1e}  {'PASS' if ok else 'FAIL'}")
      total_time += secs
    except Exception as e:  # pylint: disable=broad-except
      ok = False
      line = f"{c.name:48s} {c.source[:34]:34s} {'error':>11s}    {'':10s}  FAIL ({e!r})"
    failed += not ok
    print(line, flush=True)
  print("-" * len(header))
  print(f"{len(selected) - failed} passed, {failed} failed ({total_time:.1f} s)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
