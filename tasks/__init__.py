"""Prefect tasks: thin typed wrappers over `alexnet` (retries, caching policy, logging)."""
