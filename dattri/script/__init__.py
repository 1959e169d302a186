"""The published console-script modules (``dattri.script.dattri_retrain`` ...).

Both call dattri's own entry points (``dattri.benchmark.cli``), which keep the
published arguments.
"""
