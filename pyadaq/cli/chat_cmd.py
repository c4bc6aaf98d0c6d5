"""`pyadaq chat`: talk to a local GGUF model with the KV-cache types of your choice.

Answers stream as they come. Models with a chat template get it; base models without one
(the embedded Gemma 3 270M is one) continue a plain "User: / Assistant:" transcript under a
short system line (pyadaq.model.chat_template; --system replaces it, --system "" drops it). The
conversation stays in the KV cache between turns: each turn evaluates only the new tokens
(llama-cpp-python reuses the cached prefix). Commands: /stats (cache types, KV size against
f16, prompt and generation speed of the last answer), /reset (forget the conversation),
/help. Ctrl-C stops the current answer, Ctrl-D (end of input) leaves.

From a pipe, every line of standard input is one prompt and the answers go to standard
output, one after another, nothing else (messages go to standard error).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pyadaq.cli._common import add_model_options, load_llama_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a local model (streaming, KV cache kept between turns)",
                       description=__doc__)
    add_model_options(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


class Chat:
    """One conversation with a model; turn() streams the answer to `out`."""

    def __init__(self, llm, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7,
                 seed: int = 0):
        self.llm = llm
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.messages: list = []
        self.last: dict = {}

    def reset(self) -> None:
        self.messages = []
        self.last = {}

    def turn(self, user: str, out) -> str:
        from pyadaq._native import native
        from pyadaq.model import chat_template

        L = native().llama_cpp
        ctx = self.llm._ctx.ctx
        L.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        # a model without a chat template gets pyadaq's transcript (pyadaq.model.chat_template)
        # (an empty system message drops the transcript's default system line; a model's own
        # template gets no empty system message)
        fallback = not chat_template.has_chat_template(self.llm.metadata)
        keep = self.system if self.system is not None and (self.system or fallback) else None
        msgs = [{"role": "system", "content": keep}] if keep is not None else []
        for m in self.messages:
            msgs += [{"role": "user", "content": m["user"]}, {"role": "assistant", "content": m["assistant"]}]
        msgs.append({"role": "user", "content": user})
        stream = self.llm.create_chat_completion(msgs, max_tokens=self.max_tokens, temperature=self.temperature,
                                                 seed=self.seed, stream=True)

        def pieces():
            for ch in stream:
                yield ch["choices"][0]["delta"].get("content") or ""

        answer = []
        interrupted = False
        try:
            for piece in pieces():
                if not answer:  # the transcript's answer starts after "Assistant:" with a space
                    piece = piece.lstrip()
                    if not piece:
                        continue
                answer.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if hasattr(stream, "close"):
                stream.close()
        out.write("\n")
        out.flush()
        text = "".join(answer).strip()
        self.messages.append({"user": user, "assistant": text})
        perf = L.llama_perf_context(ctx)
        self.last = {"prompt_tokens": int(perf.n_p_eval), "prompt_ms": float(perf.t_p_eval_ms),
                     "gen_tokens": int(perf.n_eval), "gen_ms": float(perf.t_eval_ms),
                     "seconds": time.perf_counter() - t0, "interrupted": interrupted}
        return text

    def stats(self) -> str:
        from pyadaq.runtime.llama import estimate_kv_cache_bytes

        llm = self.llm
        f16 = estimate_kv_cache_bytes(llm.model_info, "f16", "f16", n_ctx=llm.n_ctx(), n_batch=llm.n_batch,
                                      n_ubatch=llm.context_params.n_ubatch, swa_full=bool(llm.context_params.swa_full))
        got = llm.kv_cache_bytes
        if llm.kv_plan is not None:
            types = f"per-layer plan, {llm.kv_plan.bits_per_value:.2f} bits per value"
        else:
            types = f"K {llm.cache_type_k.name}, V {llm.cache_type_v.name}"
        window = llm.kv_window_bytes
        if window:
            types += f", the last {llm.kv_window} tokens also in f16 ({window / 2**20:.2f} MiB, counted)"
            got += window
        lines = [(f"KV cache: {types}; {got / 2**20:.2f} MiB against {f16 / 2**20:.2f} MiB with f16 "
                 f"({got / f16:.0%}); {llm.n_tokens} of {llm.n_ctx()} tokens in use")]
        s = self.last
        if s:
            def rate(n, ms):  # an interrupted answer may have no timed tokens
                return f"{n / (ms / 1e3):.1f} t/s" if n > 0 and ms > 0 else "no speed measured"

            pp, tg = rate(s["prompt_tokens"], s["prompt_ms"]), rate(s["gen_tokens"], s["gen_ms"])
            lines.append(f"last answer: {s['prompt_tokens']} new prompt tokens ({pp}), "
                         f"{s['gen_tokens']} generated ({tg})" + (" (interrupted)" if s.get("interrupted") else ""))
        return "\n".join(lines)


def run(args) -> int:
    model, _info, llm = load_llama_from_args(args, seed=args.seed)
    chat = Chat(llm, args.system, args.max_tokens, args.temperature, args.seed)
    interactive = sys.stdin.isatty()
    try:
        if interactive:
            print(f"{Path(model).name}: /stats, /reset, /help; Ctrl-C stops an answer, Ctrl-D leaves.", file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            cmd = line.strip()
            if not cmd:
                continue
            if cmd == "/stats":
                print(chat.stats(), file=sys.stderr if not interactive else sys.stdout)
                continue
            if cmd == "/reset":
                chat.reset()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if cmd in ("/help", "/?"):
                print(__doc__, file=sys.stderr)
                continue
            chat.turn(line, sys.stdout)
    finally:
        llm.close()
    return 0
