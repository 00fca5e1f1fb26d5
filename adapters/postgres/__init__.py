"""PostgreSQL through asyncpg, one module per aggregate.

- ``connect``: the DSN (or the embedded server) and the pool;
- ``migrations``: numbered SQL files, applied once per deploy under an advisory lock;
- ``chats``: chats, members, contacts, delivered/read pointers;
- ``messages`` (+ ``commands``): persisting batches with seq and outbox, history, receipts;
- ``outbox``: what the fast path left undelivered;
- ``attachments``: attachment records and their claims;
- ``notifications``: accepted notifications, their outbox, attempts, idempotency keys.

Each class implements the ports of ``stages.ports`` (see their guarantees there).
"""
