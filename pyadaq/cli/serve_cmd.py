"""`pyadaq serve`: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions,
/v1/models, streaming) with pyadaq's KV-cache types or a per-layer plan. The default engine is
the bundled llama-server (parallel slots, continuous batching, /health, /metrics); `--engine
python` is llama-cpp-python's server (one request at a time; KV calibrations; needs
pip install "pyadaq[server]"). A model without a chat template gets pyadaq's transcript template
in both (see pyadaq/model/chat_template.py); --chat-template-file overrides it."""

from __future__ import annotations

import contextvars
import json
import sys
import threading
from pathlib import Path

# the cancellation flag of the HTTP request a generation serves (python engine)
_CANCELLED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("pyadaq_cancelled",
                                                                                   default=None)


def add_parser(sub) -> None:
    from pyadaq.cli._common import add_model_options

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with pyadaq's KV cache", description=__doc__)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--alias", help="model name in the API (default: the file name)")
    p.add_argument("--engine", choices=("llama", "python"), default="llama",
                   help="llama: the bundled llama-server (default); python: llama-cpp-python's server")
    p.add_argument("--parallel", type=int,
                   help="requests served at once, each slot getting ctx/parallel tokens (llama engine; default 4)")
    p.add_argument("--chat-template-file", metavar="FILE",
                   help="Jinja chat template instead of the model's own (or pyadaq's fallback)")
    p.add_argument("--log", metavar="FILE", help="llama-server's log (default: in pyadaq's cache directory)")
    p.add_argument("--verbose", action="store_true", help="llama-server's log on the terminal")
    p.set_defaults(func=run)


def make_app(llm, alias: str, host: str, port: int):
    """The llama-cpp-python FastAPI app serving the already loaded `llm` (a pyadaq.Llama)."""
    try:
        import llama_cpp.server.app as server_app
        import llama_cpp.server.model as server_model
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise ImportError(f"pyadaq serve needs the server extra: pip install 'pyadaq[server]' ({e})") from None

    def load(settings):  # the proxy asks for the model by its settings: hand it ours
        return llm

    server_model.LlamaProxy.load_llama_from_model_settings = staticmethod(load)
    _client_errors_are_4xx()
    _answers_name_the_alias_and_stop_when_the_client_goes(llm, alias)
    model_settings = ModelSettings(model=str(llm.model_path), model_alias=alias, n_ctx=llm.n_ctx(), verbose=False)
    app = server_app.create_app(server_settings=ServerSettings(host=host, port=port),
                                model_settings=[model_settings])
    app.add_middleware(_RequestGuard)
    return app


def _answers_name_the_alias_and_stop_when_the_client_goes(llm, alias: str) -> None:
    """Every completion (chat completions go through it too) names the model by its alias, as
    /v1/models does, not by its path; and stops once its HTTP client has disconnected."""
    import llama_cpp

    create = llm.create_completion

    def create_completion(*args, **kwargs):
        kwargs["model"] = alias
        cancelled = _CANCELLED.get()
        if cancelled is not None:
            stopping = llama_cpp.StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
            stopping.append(lambda _ids, _logits: cancelled.is_set())
            kwargs["stopping_criteria"] = stopping
        return create(*args, **kwargs)

    llm.create_completion = create_completion


class _RequestGuard:
    """ASGI middleware for POST requests: a body that is empty or not JSON gets a 400 up front
    (llama-cpp-python's error handler parses the body again and would answer 500); and the
    request's cancellation flag is set when its client disconnects, which stops its generation
    (llama-cpp-python checks for a disconnect only between streamed chunks)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        import asyncio

        from starlette.responses import JSONResponse

        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        problem = None
        if not body.strip():
            problem = "request body is empty (a JSON object is expected)"
        else:
            try:
                json.loads(body)
            except ValueError as e:
                problem = f"request body is not JSON: {e}"
        if problem is not None:
            response = JSONResponse({"error": {"message": problem, "type": "invalid_request_error",
                                               "param": None, "code": None}}, status_code=400)
            return await response(scope, receive, send)

        cancelled, gone = threading.Event(), asyncio.Event()

        async def watch():  # the only reader of the connection once the body is in
            while True:
                if (await receive())["type"] == "http.disconnect":
                    cancelled.set()
                    gone.set()
                    return

        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_for_app():
            if replay:
                return replay.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        token = _CANCELLED.set(cancelled)
        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, receive_for_app, send)
        finally:
            _CANCELLED.reset(token)
            watcher.cancel()


def _client_errors_are_4xx() -> None:
    """llama-cpp-python 0.3.36 answers a request that fails validation with a 500 and a
    traceback on the server; make it a 422 naming each field and what is wrong with it (OpenAI's
    error shape; no server file paths)."""
    from fastapi.exceptions import RequestValidationError

    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    original = RouteErrorHandler.error_message_wrapper
    if getattr(original, "_pyadaq", False):
        return

    def wrapper(self, error, body=None):
        if isinstance(error, RequestValidationError):
            return 422, ErrorResponse(message=validation_message(error.errors()), type="invalid_request_error",
                                      param=None, code=None)
        return original(self, error, body)

    wrapper._pyadaq = True
    RouteErrorHandler.error_message_wrapper = wrapper


def validation_message(errors) -> str:
    """'messages: Input should be a valid list; ...' from pydantic's error list."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def run(args) -> int:
    if args.engine == "llama":
        from pyadaq.cli.serve_llama import run_server

        return run_server(args)
    if args.parallel not in (None, 1):
        raise ValueError(f"--parallel {args.parallel}: the python engine answers one request at a time "
                         "(use the default engine, llama-server, for parallel slots)")
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"pyadaq serve --engine python needs the server extra: pip install 'pyadaq[server]' "
                          f"({e})") from None
    from pyadaq.cli._common import check_port, load_llama_from_args
    from pyadaq.runtime.llama import template_chat_handler

    check_port(args.host, args.port)
    template = None
    if args.chat_template_file:
        try:
            template = Path(args.chat_template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the chat template file {args.chat_template_file}: "
                             f"{e.strerror or e}") from None
    model, _info, llm = load_llama_from_args(args)
    if template is not None:
        try:
            llm.chat_handler = template_chat_handler(llm, template)
        except Exception as e:  # jinja2's TemplateError: the file's own fault, said before serving
            llm.close()
            raise ValueError(f"chat template {args.chat_template_file}: {e}") from None
    alias = args.alias or Path(model).name
    app = make_app(llm, alias, args.host, args.port)
    types = (f"per-layer plan ({llm.kv_plan.bits_per_value:.2f} bits per value)" if llm.kv_plan is not None
             else f"K {llm.cache_type_k.name}, V {llm.cache_type_v.name}")
    if llm.kv_window:
        types += f" (the last {llm.kv_window} tokens also in f16)"
    print(f"pyadaq serve: {alias} with KV cache {types} on http://{args.host}:{args.port}/v1 (python engine)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
