"""The OpenAI-compatible gateway: wire protocol, routers, error handling and the app."""
