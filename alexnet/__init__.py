"""alexnet-pipeline: the AlexNet paper's system as a reproducible workflow.

Importing the package does nothing to the host process; entry points (the CLI, a stage's
`python -m flows.<stage>`, a torchrun rank, the benchmarks) call
`alexnet.runtime.configure()` themselves.
"""
