"""Gate training: the objective (losses), chat-formatted data (data), the trainer (`python -m trimkv train`)."""
