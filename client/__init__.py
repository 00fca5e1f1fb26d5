"""A client of the Conveyor wire protocol (``PROTOCOL.md``), for applications, the
benchmark and the tests alike.

- :class:`WsClient` (``client.ws``): one WebSocket connection — frames with generated
  client ids, acks awaited by id, receipts, ``sync``, and reconnect with catch-up.
- :class:`SeqTracker` (``client.seqs``): which ``seq`` of each chat the caller has seen.
- :class:`HttpClient` and :func:`create_chat` (``client.rest``): the HTTP endpoints.
- ``client.errors``: what the client raises.

It depends on ``websockets``, ``httpx`` and ``orjson`` only.
"""

from client.errors import ClientError, HandshakeRefused, ProtocolError, ReplyTimeout, ServerError
from client.rest import HttpClient, create_chat, history
from client.seqs import SeqTracker
from client.ws import Frame, WsClient

__all__ = [
    "ClientError",
    "Frame",
    "HandshakeRefused",
    "HttpClient",
    "ProtocolError",
    "ReplyTimeout",
    "SeqTracker",
    "ServerError",
    "WsClient",
    "create_chat",
    "history",
]
