"""The embeddings HTTP endpoint: request format and batching (app.py), safe image fetching (fetch.py), `dinotrain serve`
(run.py)."""
