"""`POST /predict` in plain ASGI when it is the common case; FastAPI answers everything else.

A bare FastAPI endpoint with `/predict`'s request and answer models is about 0.25 ms
slower at the median than a plain ASGI function on this machine (routing, dependency
solving, the request object, the response model), and its 99th percentile is two to four
times the plain function's. For a request the API answers in under a millisecond, that is
most of what it can save. So the app is wrapped: a `POST /predict` with a JSON body, while
the API answers on the event loop (`ready()`: the model is loaded and checked, the store
local), is parsed and validated exactly as FastAPI does (`json.loads`, then the request
model), answered by the same function, and written with the same serializer.

Everything else goes to the FastAPI app, untouched: other paths, other content types, a
request that does not validate, and any error the answer raises (404, 503, 500). Those
are replayed to FastAPI with the body already read, so their responses (status, detail,
exception handlers) are FastAPI's own, byte for byte; an error is answered twice, which
is harmless, as an answer only reads. Middleware added to the FastAPI app does not see
the requests answered here. `tests/ml/test_ml.py` compares both paths on the same requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

PATH = "/predict"
MAX_BODY = 64 * 1024
"""A larger body is not a prediction request of ours: FastAPI reads and rejects it."""


def _json_body(scope: Message) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _request_id(scope: Message) -> str | None:
    """Return the first `X-Request-ID` header, decoded as FastAPI decodes headers (Latin-1)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return bytes(value).decode("latin-1")
    return None


class PredictFastPath:
    """ASGI middleware: answer the common `/predict` itself, pass everything else on."""

    def __init__(
        self,
        app: ASGIApp,
        request_model: type[BaseModel],
        ready: Callable[[], bool],
        answer: Callable[[Any, str | None, float], BaseModel],
    ) -> None:
        self.app = app
        self._request_model = request_model
        self._ready = ready
        self._answer = answer

    def __getattr__(self, name: str) -> Any:
        # The wrapped FastAPI app's attributes (`routes`, `openapi`, `state`) stay readable.
        # Middleware added to it does not see the requests answered here: add behaviour
        # every prediction needs to the answer function instead.
        app = self.__dict__.get("app")
        if app is None:  # a copy being built, before `__init__`
            raise AttributeError(name)
        return getattr(app, name)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        """Answer a ready `POST /predict` here; give anything else to the app."""
        started = time.perf_counter()
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or not _json_body(scope)
            or not self._ready()
        ):
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: FastAPI sees it
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False) or size > MAX_BODY:
                break
        done = read[-1]["type"] == "http.request" and not read[-1].get("more_body", False)
        payload = None
        request_id = ""
        # Ready again: the body may have taken long enough for the model check to be due,
        # and that check reads the registry, which is the thread pool's work (FastAPI's).
        if done and size <= MAX_BODY and self._ready():
            try:
                request = self._request_model.model_validate(json.loads(b"".join(chunks)))
                answered = self._answer(request, _request_id(scope), started)
                request_id = str(getattr(answered, "request_id", ""))
                payload = answered.model_dump_json().encode()
            except Exception:  # FastAPI answers it, as it always has
                payload = None
        if payload is None:
            await self.app(scope, _replay(read, receive), send)
            return
        headers = [
            (b"content-length", str(len(payload)).encode()),
            (b"content-type", b"application/json"),
        ]
        if request_id:
            headers.append((b"x-request-id", request_id.encode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(read: list[Message], receive: Receive) -> Receive:
    """Return a `receive` that gives the messages already read, then the rest."""
    pending = list(read)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
