"""The BASELINE: the seed's server (FastAPI, one list of clients, a `for` loop of `send_text`).

    uvicorn bench.seed_fastapi:app --port 8001

This is the design the project's seed spec describes (its FastAPI server.py), kept faithful on
purpose so that bench/compare.py can measure mt5hub against it: a publisher (the DLL) connects to
`/ws/dll` with the token (`Authorization: Bearer <token>` or `?token=`, default "supersecret123");
every text it sends is broadcast to a module-level list of viewer websockets (`/ws`) by awaiting
each `send_text` in turn, and a viewer whose send fails is removed. Served by plain uvicorn (its
default WebSocket implementation, which negotiates permessage-deflate per connection if offered).

The ONLY change to the seed's behaviour, so that scripts/fake_dll.py can measure it like mt5hub:
each forwarded publish is spliced into mt5hub's update frame by string operations (no
re-encoding): `{"type":"update",` + the publish's JSON body without its braces + `,"seq":N}`, N
counting per (key, src); and a new viewer first gets an empty snapshot,
`{"type":"snapshot","tables":[]}` (the seed sends nothing on connect and keeps no state).
fake_dll's publishers send no application pings, so no pong handling is added.
"""

from __future__ import annotations

import json
import os

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

TOKEN = os.environ.get("MT5_TOKEN", "supersecret123")

app = FastAPI()
clients: list[WebSocket] = []  # the seed: every connected viewer, in one list
seqs: dict[tuple[str, str], int] = {}  # BENCH: seq per (key, src), for the load tester


def as_update(text: str) -> str:
    """BENCH: the publish spliced into mt5hub's update frame; anything else as it came."""
    try:
        publish = json.loads(text)  # only to find (key, src): the text itself is not re-encoded
        table = (str(publish["key"]), str(publish["src"]))
    except (ValueError, TypeError, KeyError):
        return text
    seqs[table] = seq = seqs.get(table, 0) + 1
    return f'{{"type":"update",{text.strip()[1:-1]},"seq":{seq}}}'


async def broadcast(text: str) -> None:
    """The seed's broadcast: one send after the other; a failed send removes that viewer."""
    for client in list(clients):
        try:
            await client.send_text(text)
        except Exception:  # the seed's bare `except:`
            if client in clients:
                clients.remove(client)


@app.websocket("/ws/dll")
async def dll(websocket: WebSocket) -> None:
    auth = websocket.headers.get("authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else websocket.query_params.get("token")
    if token != TOKEN:
        await websocket.close(code=1008)  # before accept: uvicorn answers the upgrade with 403
        return
    await websocket.accept()
    try:
        while True:
            await broadcast(as_update(await websocket.receive_text()))
    except WebSocketDisconnect:
        pass


@app.websocket("/ws")
async def viewer(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text('{"type":"snapshot","tables":[]}')  # BENCH: see the docstring
    clients.append(websocket)
    try:
        while True:
            await websocket.receive_text()  # the seed ignores what viewers say
    except WebSocketDisconnect:
        pass
    finally:
        if websocket in clients:
            clients.remove(websocket)
