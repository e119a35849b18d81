"""The embeddings HTTP endpoint: request format and batching (app.py), safe image fetching (fetch.py)."""
