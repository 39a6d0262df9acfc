"""tdaserve's web service: a thin FastAPI layer over the engine, the indexer and the workers."""

__version__ = "0.1.0"
