"""HTTP serving: an OpenAI-compatible API over the continuous-batching engine (``app.create_app``)."""
