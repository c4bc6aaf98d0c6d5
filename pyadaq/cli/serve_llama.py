"""`pyadaq serve`'s default engine: the bundled llama-server (parallel slots, continuous
batching, prompt cache, /health, /metrics) started with pyadaq's cache types, checked here first.

:func:`server_args` turns serve's options into llama-server's (every check that needs no native
code done before anything starts); :func:`run_server` starts it, waits for ``/health``, prints
the URL, and forwards Ctrl-C / SIGTERM so that no server is left running.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 600.0  # model loading; the server's exit ends the wait sooner


def _types_and_plan(args, info, model: str) -> tuple[list[str], str]:
    """(llama-server's cache options, a description of the types)."""
    from pyadaq.runtime.kvplan import load_checked
    from pyadaq.runtime.llama import validate_cache_types
    from pyadaq.types import cache_type

    if args.kv_calibration is not None:
        raise ValueError("llama-server does not load KV calibrations (--kv-calibration): use `pyadaq serve "
                         "--engine python` for calibrated caches")
    if getattr(args, "kv_window", 0):
        raise ValueError("llama-server keeps no KV window (--kv-window): use `pyadaq serve --engine python`")
    if args.kv_budget is not None:
        from pyadaq._paths import cache_dir
        from pyadaq.plan.calibrate import check_budget_range, default_types, plan_for_budget
        from pyadaq.plan.planner import Budget

        types = default_types("kl", None)
        check_budget_range(info, args.kv_budget, types)
        plan = plan_for_budget(model, args.kv_budget, kv_calibration=None)
        label = Budget.parse(args.kv_budget).label.replace("/", "-")
        path = cache_dir("serve") / f"plan-{info.sha256[:16]}-{label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
        args.kv_plan = str(path)
    if args.kv_plan is not None:
        plan, _, _ = load_checked(args.kv_plan, info)
        return ["--kv-plan", str(Path(args.kv_plan).resolve())], \
            f"per-layer plan {Path(args.kv_plan).name} ({plan.bits_per_value:.2f} bits per value)"
    tk, tv = cache_type(args.cache_type_k), cache_type(args.cache_type_v or "kvq2")
    for t in (tk, tv):
        if t.calibrated:
            raise ValueError(f"{t.name} stores a KV calibration's coordinates, which llama-server does not load: "
                             "use `pyadaq serve --engine python --kv-calibration FILE`")
    validate_cache_types(info, tk, tv, flash_attn=True)
    return ["-ctk", tk.name, "-ctv", tv.name], f"K {tk.name}, V {tv.name}"


def server_args(args) -> tuple[list[str], str]:
    """(llama-server's argv after the executable, what is served in words) for serve's options."""
    from pyadaq.cli._common import resolve_model
    from pyadaq.model.chat_template import STOP, has_chat_template, template_path

    model, info = resolve_model(args.model)
    args.parallel = 4 if args.parallel is None else args.parallel
    if args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel}: at least one slot")
    if info.n_ctx_train and args.ctx > info.n_ctx_train:
        raise ValueError(f"--ctx {args.ctx} is larger than the model's training context ({info.n_ctx_train})")
    per_slot = args.ctx // args.parallel
    if per_slot < 64:
        raise ValueError(f"--ctx {args.ctx} over {args.parallel} slots leaves {per_slot} tokens a slot (at least 64)")
    cache, types = _types_and_plan(args, info, model)
    alias = args.alias or Path(model).name
    argv = ["-m", model, "--host", args.host, "--port", str(args.port), "-c", str(args.ctx),
            "-np", str(args.parallel), "-fa", "on", "--alias", alias, *cache]
    if args.threads:
        argv += ["-t", str(args.threads)]
    if args.gpu_layers is not None:
        argv += ["-ngl", "all" if args.gpu_layers < 0 else str(args.gpu_layers)]
    if args.rpc:
        from pyadaq.runtime import rpc

        servers = rpc.parse_servers(args.rpc)
        rpc.check_servers(servers)  # llama-server would abort on a server it cannot reach
        argv += ["--rpc", ",".join(servers)]
        what_rpc = f", layers on {len(servers)} RPC server(s)"
    else:
        what_rpc = ""
    if args.chat_template_file:
        if not Path(args.chat_template_file).is_file():
            raise ValueError(f"chat template file not found: {args.chat_template_file}")
        argv += ["--chat-template-file", args.chat_template_file]
    elif not has_chat_template(info.metadata):
        # the same fallback as pyadaq.Llama's: a transcript, ended at the next "User:"
        argv += ["--chat-template-file", str(template_path()), "-r", STOP]
    return argv, f"{alias} with KV cache {types}, {args.parallel} slots of {per_slot} tokens{what_rpc}"


def _get(url: str, timeout: float = 2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, b""


def _die_with_parent() -> None:
    """In the child: SIGTERM when pyadaq dies, even by SIGKILL (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_server(args) -> int:
    from pyadaq.cli._common import check_port
    from pyadaq.tools import tool_command, tool_env

    check_port(args.host, args.port)
    argv, what = server_args(args)
    command = tool_command("llama-server", argv, default_model=False)
    log = None
    if args.verbose:
        out = None
    else:
        from pyadaq._paths import cache_dir

        log_path = Path(args.log) if args.log else cache_dir("serve") / f"llama-server-{args.port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = out = open(log_path, "w")  # noqa: SIM115  (closed when the server ends)
    proc = subprocess.Popen(command, env=tool_env(), stdout=out, stderr=subprocess.STDOUT if out else None,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        base = f"http://{host}:{args.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and not stopping:
            status, _ = _get(base + "/health")
            if status == 200:
                where = "" if log is None else f" (llama-server's log: {log.name})"
                print(f"pyadaq serve: {what} on {base}/v1{where}", file=sys.stderr, flush=True)
                break
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"llama-server did not become ready within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            rc = proc.wait()
        if stopping:
            return 0
        if rc != 0:
            tail = ""
            if log is not None:
                log.flush()
                tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-15:])
            print(f"pyadaq serve: llama-server exited with status {rc}" + (f"; its last lines:\n{tail}" if tail
                                                                         else ""), file=sys.stderr)
            return 1
        return 0
    finally:
        if proc.poll() is None:  # an exception here: never leave the server behind
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, h in previous.items():
            signal.signal(s, h)
        if log is not None:
            log.close()
