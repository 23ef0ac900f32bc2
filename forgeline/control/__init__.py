"""forgeline's control plane: models, approvals, promotions, rollback and history over HTTP.

``create_control_app()`` builds the FastAPI app; ``forgeline control serve`` runs it.
Every endpoint but ``/health`` needs an API key (``Authorization: Bearer fl-...``) from
``registry.keys.KeyStore``; the key's name is the actor recorded in the audit log and
approvals, and its roles decide what it may do.
"""

from forgeline.control.app import create_control_app

__all__ = ["create_control_app"]
