"""The reference definitions: pure numpy metric functions, one module per family, each
citing its source (paper section or the authors' code). They work on token rows per MoE
layer and are hand-tested in tests/analyzer/test_metrics.py.

Production computes the same quantities from counts folded per block (`profiles`,
`kernels`, `fold`, `tables/`), or calls these functions directly. Where it computes
them another way it is tested equal to them here, on random and edge-case inputs:
profiles, per-sequence statistics and rollout curves
(test_production_equals_reference.py), compiled statistics (test_kernels.py),
committee rows (test_alignment.py). Pair tables call `usage.cosine` and
`usage.top_p_jaccard` directly.
"""
