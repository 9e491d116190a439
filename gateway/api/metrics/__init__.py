"""Prometheus metrics of a gateway: the instruments, the job counts from the EVENTS stream, and
the gauges read at each scrape (see docs/METRICS.md)."""
