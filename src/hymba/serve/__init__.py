"""`hymba serve`: an OpenAI-compatible HTTP API (`hymba.serve.app`) on the continuous-batching engine.

FastAPI and uvicorn are an optional extra, imported only by `hymba.serve.app` and when the command runs.
"""
