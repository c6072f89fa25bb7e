"""The fitter's parts: memory model, speed model, plans, choosing, rendering, dry runs.

The public entry points live in `localllm.fitter`.
"""
