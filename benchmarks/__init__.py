"""Measuring harness: parameters, FLOPs, MACs (the seeds' convention), latency, throughput, memory.

``python -m benchmarks.measure --help`` compares a dense and a compressed model side by side;
``python -m benchmarks.plot --help`` plots a metric against FLOPs from runs' ``results.json``.
Entry scripts call :func:`benchmarks.measure.model_cost` to record a model's cost.
"""
