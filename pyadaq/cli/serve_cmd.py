"""`pyadaq serve`: llama-cpp-python's OpenAI-compatible server (/v1/chat/completions,
/v1/completions, /v1/models, streaming included) on pyadaq's library, with the chosen KV-cache
types or per-layer plan. Needs the server extra: pip install "pyadaq[server]"."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from pyadaq.cli._common import add_model_options

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with pyadaq's KV cache", description=__doc__)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--alias", help="model name in the API (default: the file name)")
    p.set_defaults(func=run)


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a TCP port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                         "(is another server running there?)") from None
    finally:
        s.close()


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
    model_settings = ModelSettings(model=str(llm.model_path), model_alias=alias, n_ctx=llm.n_ctx(), verbose=False)
    app = server_app.create_app(server_settings=ServerSettings(host=host, port=port),
                                model_settings=[model_settings])

    @app.middleware("http")
    async def reject_non_json(request, call_next):
        # llama-cpp-python's error handler reads the body as JSON again while handling an
        # error; a body that is not JSON would end as a 500: answer 400 up front
        from starlette.responses import JSONResponse

        if request.method == "POST" and request.url.path.startswith("/v1/"):
            body = await request.body()
            try:
                json.loads(body or b"null")
            except ValueError as e:
                return JSONResponse({"error": {"message": f"request body is not JSON: {e}",
                                               "type": "invalid_request_error"}}, status_code=400)
        return await call_next(request)

    return app


def _client_errors_are_4xx() -> None:
    """llama-cpp-python 0.3.36 answers a request that fails validation with a 500 and a
    traceback on the server; make it a 422 naming what is wrong (OpenAI's error shape)."""
    from fastapi.exceptions import RequestValidationError

    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    original = RouteErrorHandler.error_message_wrapper
    if getattr(original, "_pyadaq", False):
        return

    def wrapper(self, error, body=None):
        if isinstance(error, RequestValidationError):
            return 422, ErrorResponse(message=str(error), type="invalid_request_error", param=None, code=None)
        return original(self, error, body)

    wrapper._pyadaq = True
    RouteErrorHandler.error_message_wrapper = wrapper


def run(args) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"pyadaq serve needs the server extra: pip install 'pyadaq[server]' ({e})") from None
    from pyadaq.cli._common import load_llama_from_args

    check_port(args.host, args.port)
    model, _info, llm = load_llama_from_args(args)
    alias = args.alias or Path(model).name
    app = make_app(llm, alias, args.host, args.port)
    types = (f"per-layer plan ({llm.kv_plan.bits_per_value:.2f} bits per value)" if llm.kv_plan is not None
             else f"K {llm.cache_type_k.name}, V {llm.cache_type_v.name}")
    print(f"pyadaq serve: {alias} with KV cache {types} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
