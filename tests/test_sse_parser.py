"""The SDK's SSE parser reads what the gateway's streams send, keep-alives included."""

from __future__ import annotations

from litestar.response.sse import ServerSentEventMessage

from sdk._protocol import SSEParser


def _events(*messages: ServerSentEventMessage) -> list[dict[str, object]]:
    parser = SSEParser()
    body = b"".join(message.encode() for message in messages).decode()
    return [event for line in body.splitlines() if (event := parser.feed(line)) is not None]


def test_a_keep_alive_is_no_event_whichever_way_it_is_sent() -> None:
    event = ServerSentEventMessage(data='{"id": 7, "type": "queued"}', event="queued", id=7)
    # Litestar sends an empty `data:` line with a comment unless told not to.
    with_empty_data = ServerSentEventMessage(comment="keep-alive")
    comment_only = ServerSentEventMessage(comment="keep-alive", data=None)
    assert _events(with_empty_data, event, comment_only, event) == [
        {"id": 7, "type": "queued"},
        {"id": 7, "type": "queued"},
    ]
