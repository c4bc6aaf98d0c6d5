"""`pyadaq tool NAME [ARGS...]`: run one of llama.cpp's own tools, built with pyadaq's libraries."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from pyadaq.tools import TOOLS

    listing = "\n".join(f"  {name:<17} {what}" for name, (_, what) in TOOLS.items())
    p = sub.add_parser(
        "tool", help="run llama.cpp's llama-server, llama-cli, llama-bench, llama-perplexity or rpc-server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one of llama.cpp's tools, built from the same patched llama.cpp as pyadaq and using "
                    "its libraries, so that -ctk/-ctv accept kvq2 and kvq3. Everything after NAME goes to the "
                    "tool (`pyadaq tool NAME --help` shows its options). A tool that loads a model and is given "
                    f"none (-m) gets the embedded one.\n\ntools:\n{listing}\n\nexample:\n"
                    "  pyadaq tool llama-bench -ctk q8_0 -ctv kvq2 -fa 1")
    p.add_argument("name", nargs="?", help="the tool (without it: list the tools and where they are)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    p.set_defaults(func=run)


def run(args) -> int:
    from pyadaq.tools import TOOLS, ToolNotBuiltError, exec_tool, tool_path

    if args.name is None:
        for name, (_, what) in TOOLS.items():
            try:
                where = str(tool_path(name))
            except ToolNotBuiltError:
                where = "(not built)"
            print(f"{name:<17} {what}\n{'':<17} {where}")
        return 0
    return exec_tool(args.name, args.args)
