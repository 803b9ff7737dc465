"""`kiln serve`: the chatbot over HTTP: an OpenAI-compatible API, a web chat, runs, adapters."""
