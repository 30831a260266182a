"""One structured log line per HTTP request, on the logger ``app.access``.

Each line is a JSON object (so a path or client name cannot forge extra lines or fields)::

    {"method": "POST", "path": "/detect", "status": 200, "latency_ms": 41.7, "bytes_in": 10342,
     "bytes_out": 512, "client": "127.0.0.1"}

``status`` is 500 when an exception escaped (the client gets a bare 500) and 499 when the request was cancelled
(the client disconnected) before an answer. The same fields are attached to the log record as ``record.access``
for handlers that format records themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ACCESS_LOGGER", "AccessLogMiddleware", "ensure_log_output"]

ACCESS_LOGGER = "app.access"
_HANDLER_MARK = "_rnnpool_default_handler"


class AccessLogMiddleware:
    """ASGI middleware logging method, path, status, latency, bytes in/out and client of every HTTP request.

    Args:
        app: the wrapped ASGI application.
        logger: where to log (INFO); default ``logging.getLogger("app.access")``.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        bytes_in = bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        except asyncio.CancelledError:
            status = status or 499  # the client went away (nginx's code for it); nothing was answered
            raise
        except BaseException:
            status = status or 500  # the outer error middleware answers 500
            raise
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                client = scope.get("client")
                fields: dict[str, Any] = {
                    "method": scope.get("method", ""),
                    "path": scope.get("path", ""),
                    "status": status,
                    "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "client": client[0] if client else None,
                }
                self.logger.info(json.dumps(fields, ensure_ascii=True), extra={"access": fields})


def ensure_log_output(name: str = "app") -> None:
    """Makes INFO records of logger ``name`` (and its children, e.g. ``app.access``) visible on stderr.

    Under ``uvicorn`` nothing configures the root logger, so without this the access lines would be dropped. Does
    nothing when the root logger already has handlers (the application, pytest or a logging config decides) or
    when this was done before.
    """
    logger = logging.getLogger(name)
    if logging.getLogger().handlers or any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
