"""Reduce step, one module per table family: pure functions of folds and profiles (no
Ray, no I/O), each returning polars DataFrames."""
