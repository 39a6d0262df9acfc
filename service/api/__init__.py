"""The FastAPI application: ``create_app`` in ``service.api.app``."""
