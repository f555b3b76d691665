"""The orchestration layer: Prefect flows, one per stage (`python -m flows.<stage>`), the
pipeline flows and their deployments, and the command line. Logic lives in `alexnet`."""
