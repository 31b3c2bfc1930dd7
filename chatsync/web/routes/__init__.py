"""One router per resource, as FastAPI's "bigger applications" layout has them; ``app.py`` includes them."""
