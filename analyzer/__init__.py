"""Offline, Ray-parallel analyses of routing stores (no vLLM, no torch).

Metric definitions follow the two papers summarised in the project's metrics spec:
(a) "The Myth of Expert Specialization in MoEs" (arXiv:2604.09780) and
(b) "The Illusion of Specialization" / CommitteeAudit (arXiv:2601.03425).
"""
