"""An OpenAI-compatible HTTP server around one `AsyncEngine` (`kvflow serve`), and the
Prometheus metrics any engine can export (`kvflow.serve.metrics`).

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client); `metrics` needs only
prometheus_client.
"""
