"""The REST front end (Litestar): the gateway's public HTTP API."""
