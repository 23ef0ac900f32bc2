"""The approver's console: server-rendered pages for the promotion workflow under ``/console``.

Served by the control plane (same process, same port, same authorization): one login with an
API key gives a signed session cookie; every page shows only what the key's org and role allow.
No JavaScript build: Jinja2 templates, plain forms with CSRF tokens, inline SVG charts.
"""

from forgeline.control.console.routes import LoginRequired, on_login_required, router

__all__ = ["LoginRequired", "on_login_required", "router"]
