"""A FAKE OpenAI-compatible upstream for ``cmr bench serve``'s CPU cells: answers every streamed
``/v1/chat/completions`` and ``/v1/completions`` at once with one short fixed text, and
``/v1/models``. It stands in for a remote model (no real one can be reached from this machine), so
that what the benchmark measures is the gateway's own cost.

``python -m bench.fake_upstream PORT`` (run as its own process, so that its CPU is not the app's).
"""

from __future__ import annotations

import json
import sys
import time

#: what the fake answers (a few tokens)
TEXT = "fake upstream answer"


def _chunks(body: dict) -> list[dict]:
    chat = "messages" in body
    base = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": body.get("model", "fake")}

    def choice(text: str, reason: str | None) -> dict:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason} if chat else \
            {"index": 0, "text": text, "finish_reason": reason}

    usage = {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
    return [{**base, "choices": [choice(TEXT, None)]}, {**base, "choices": [choice("", "stop")]}, {**base, "choices": [], "usage": usage}]


def make_app():
    """The aiohttp application of the fake."""
    from aiohttp import web

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            c = _chunks(body)
            chat = "messages" in body
            msg = {"message": {"role": "assistant", "content": TEXT}} if chat else {"text": TEXT}
            return web.json_response({**c[0], "object": "chat.completion" if chat else "text_completion",
                                      "choices": [{"index": 0, **msg, "finish_reason": "stop"}], "usage": c[2]["usage"]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write("".join(f"data: {json.dumps(c)}\n\n" for c in _chunks(body)).encode() + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/v1/models", models)
    return app


def main(argv: list[str] | None = None) -> int:
    from aiohttp import web

    port = int((argv if argv is not None else sys.argv[1:])[0])
    web.run_app(make_app(), host="127.0.0.1", port=port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
