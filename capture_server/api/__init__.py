"""The capture service: FastAPI routes over vLLM async engines with capture on.

Layout: `config` (settings), `schemas` (request/response models), `jobs_db` (SQLite
job records), `runner` (engines and job execution), `routes` (HTTP), `app` (wiring).
"""
