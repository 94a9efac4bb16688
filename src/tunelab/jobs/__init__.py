"""OpenAI's fine-tuning API, run locally: uploaded files and fine-tuning jobs, kept in SQLite under the
server's data directory, each job a `tunelab train` run in its own subprocess (`jobs.runner`), with the
routes on `tunelab serve` (serve/routes/jobs.py).
"""
