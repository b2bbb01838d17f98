"""torch modules that ops build and formats rebuild (judge, feedback module, quantized module kinds).

The lowest layer: imports torch and third-party libraries only, never ditkit.ops, ditkit.formats or ditkit.cli.
"""
