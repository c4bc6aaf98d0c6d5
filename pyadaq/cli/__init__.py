"""pyadaq's command line: `pyadaq <command> --help`."""

from __future__ import annotations

import argparse
import sys

from pyadaq._native import native
from pyadaq._version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyadaq", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"pyadaq {__version__} ({native().build_info['info']})")
    sub = parser.add_subparsers(dest="command", required=True)
    from pyadaq.cli import (
        analyze_cmd,
        bench_cmd,
        cache_cmd,
        calibrate_cmd,
        chat_cmd,
        demo,
        eval_cmd,
        formats,
        plan_cmd,
        results,
        serve_cmd,
        tool_cmd,
        types_cmd,
    )

    for mod in (analyze_cmd, bench_cmd, cache_cmd, calibrate_cmd, chat_cmd, demo, eval_cmd, formats, plan_cmd,
                results, serve_cmd, tool_cmd, types_cmd):
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    from pyadaq.runtime.offload import KVOffloadError

    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, MemoryError, OSError, ImportError, KVOffloadError) as e:
        print(f"pyadaq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # cache entries are written whole or not at all (pyadaq._atomic): what is cached stays valid
        print(f"pyadaq {args.command}: interrupted; what was already cached is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
