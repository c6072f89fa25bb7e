"""The fitter's parts: memory model, speed model, plans, rendering, dry runs.

The public entry points are in `localllm.fitter` (fit, fit_header, fit_ladder) and
`localllm.hardware` (hardware_for); `localllm.fit.plan` holds FitRequest and Plan.
"""
