"""torch modules that ops build and formats rebuild: judge.py (the judge network), feedback.py (the feedback
module and its schedule), quantized/ (the quantized module kinds); dtypes.py and errors.py hold what they share
with the layers above (the dtype table, the root error types).

The lowest layer: imports torch and third-party libraries only, never ditkit.ops, ditkit.formats or ditkit.cli
(tests/test_layers.py checks it).
"""
