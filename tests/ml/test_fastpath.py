"""`PredictFastPath`'s ASGI handling: what it answers itself, and what FastAPI gets intact.

Whether its answers equal FastAPI's is tested on a real lake in `test_ml.py`; here, the
message handling around them: bodies in any number of parts, bodies too large, clients
that leave, and a model check that falls due while the body arrives.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from lakehouse.ml.fastpath import MAX_BODY, PredictFastPath


class Ask(BaseModel):
    n: int


class Reply(BaseModel):
    twice: int


class Identified(BaseModel):
    request_id: str
    started: float


class Inner:
    """The wrapped app: records the body it reads to its end, answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.disconnected = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def call(
    app: PredictFastPath,
    parts: list[bytes],
    *,
    content_type: bytes = b"application/json",
    disconnect: bool = False,
    path: str = "/predict",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": path,
        "headers": [(b"content-type", content_type), *headers],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent


def fast_path(inner: Inner, ready: Any = lambda: True) -> PredictFastPath:
    return PredictFastPath(inner, Ask, ready, lambda ask, _id, _started: Reply(twice=2 * ask.n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(-(2**40), 2**40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_a_body_in_any_number_of_parts_is_answered_here(n: int, cuts: list[int]) -> None:
    body = json.dumps({"n": n}).encode()
    points = sorted({min(c, len(body)) for c in cuts})
    parts = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    inner = Inner()
    sent = call(fast_path(inner), parts)
    assert inner.bodies == []
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"twice": 2 * n}
    assert (b"content-length", str(len(sent[1]["body"])).encode()) in sent[0]["headers"]


@settings(max_examples=40, deadline=None)
@given(
    body=st.one_of(
        st.just(b"x" * (MAX_BODY + 10)),
        st.just(b'{"n": "7"}'),
        st.just(b'{"n": true}'),
        st.binary(max_size=50),
    ),
    cuts=st.lists(st.integers(0, MAX_BODY + 10), max_size=4),
)
def test_anything_else_reaches_the_app_with_its_whole_body(body: bytes, cuts: list[int]) -> None:
    """Too large, invalid, or not JSON: the app reads exactly the bytes the client sent."""
    try:
        answered_here = isinstance(Ask.model_validate(json.loads(body)), Ask)
    except ValueError:
        answered_here = False
    points = sorted({min(c, len(body)) for c in cuts})
    parts = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    inner = Inner()
    sent = call(fast_path(inner), parts)
    if answered_here:
        assert sent[0]["status"] == 200 and inner.bodies == []
    else:
        assert inner.bodies == [body]
        assert sent[0]["status"] == 299


def test_other_requests_and_errors_go_to_the_app() -> None:
    inner = Inner()
    app = fast_path(inner)
    body = b'{"n": 3}'
    assert call(app, [body], content_type=b"text/plain")[0]["status"] == 299
    assert call(app, [body], path="/models")[0]["status"] == 299

    def failing(ask: Ask, request_id: str | None, started: float) -> Reply:
        raise RuntimeError("the store is gone")

    broken = PredictFastPath(inner, Ask, lambda: True, failing)
    assert call(broken, [body])[0]["status"] == 299
    assert inner.bodies == [body] * 3


def test_a_client_that_leaves_is_seen_by_the_app() -> None:
    inner = Inner()
    assert call(fast_path(inner), [b'{"n": '], disconnect=True) == []
    assert inner.disconnected == 1


def test_a_model_check_due_while_the_body_arrives_is_left_to_the_app() -> None:
    """Ready when the headers came, not after the body: FastAPI's route (the thread pool
    for the registry read) answers, not the event loop."""
    checks = iter([True, False])
    inner = Inner()
    sent = call(fast_path(inner, ready=lambda: next(checks)), [b'{"n":', b" 3}"])
    assert sent[0]["status"] == 299
    assert inner.bodies == [b'{"n": 3}']


def test_the_wrapper_copies_and_reads_through() -> None:
    import copy

    inner = Inner()
    inner.routes = ["r"]  # type: ignore[attr-defined]
    app = fast_path(inner)
    assert app.routes == ["r"]
    assert copy.copy(app).app is inner


def test_the_request_id_and_arrival_reach_the_answer_and_the_id_comes_back() -> None:
    """The first `X-Request-ID` (decoded as FastAPI decodes headers) and the arrival time
    go to the answer; an answer with a `request_id` is sent with it as `X-Request-ID`."""
    import time

    seen: list[tuple[str | None, float]] = []

    def answer(ask: Ask, request_id: str | None, started: float) -> Identified:
        seen.append((request_id, started))
        return Identified(request_id=request_id or "made-here", started=started)

    app = PredictFastPath(Inner(), Ask, lambda: True, answer)
    before = time.perf_counter()
    given_id = (b"x-request-id", "r\xe9q-1".encode("latin-1"))
    sent = call(app, [b'{"n": 1}'], headers=(given_id, (b"x-request-id", b"second")))
    assert sent[0]["status"] == 200
    assert seen[0][0] == "r\xe9q-1" and before <= seen[0][1] <= time.perf_counter()
    assert (b"x-request-id", "r\xe9q-1".encode("latin-1")) in sent[0]["headers"]
    sent = call(app, [b'{"n": 1}'])
    assert seen[1][0] is None
    assert (b"x-request-id", b"made-here") in sent[0]["headers"]
