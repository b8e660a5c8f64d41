"""Admin HTTP API: status, health checks, Prometheus metrics."""
