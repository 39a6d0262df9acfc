"""The one exception type the engine raises for bad input."""


class AttributionError(ValueError):
    """Input the engine cannot work with; the message says what was wrong and what to do."""
