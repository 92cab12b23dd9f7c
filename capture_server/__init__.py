"""moetrace capture side: the vLLM plugin, the capture API, specimen models and the store.

Importing this package loads neither vLLM nor torch; the submodules that need them
import them themselves.
"""
