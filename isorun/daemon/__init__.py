"""isorund: the daemon that owns sandboxes and serves the HTTP API.

Layout: `config` (settings from env/flags), `store` (SQLite WAL state), `auth` (API keys),
`models` (strict request bodies), `sandboxes` (lifecycle, re-adoption via
`MicroVM.adopt`, timeouts, reaper, metering), `app` (HTTP routes), `openapi`,
`main` (the `isorund` entry point: unix socket and optional TCP).
"""
