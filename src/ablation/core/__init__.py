"""Layer 1, core: errors and config reading (cli), atomic writes and output locks (io), where a
stage's outputs lie (outputs). Imports nothing else of the package.
"""
