"""Benchmarks and their workloads: what `hvjit bench` and bench/ measure (top layer)."""
