"""What tests, scripts and benches need to drive a real hub, in one place.

- `launcher`: a hub (or any helper server) in a subprocess with a generated hub.toml, ready once
  `/healthz` answers, stopped with its children, also when the process that started it is killed.
- `rawws`: a WebSocket client's bytes written by hand (`upgrade_request`, `frame`, `mask`), for
  clients that must send what a well-behaved library refuses to.
- `tables`: realistic signal tables (28 pairs x 9 timeframes, a random walk per cell).
- `tw_workaround`: a fix for trio-websocket clients that close while the hub pings them.

Nothing here is imported by the hub itself.
"""
