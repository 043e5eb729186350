"""Evaluation of drafters by real speculative decoding: prompt sets, sweeps, the results.json schema, tables, plots.

``config`` holds ``config.eval`` and its sweep axes, ``prompts`` reads prompt sets (held-out conversations,
Spec-Bench's question.jsonl, text / token-id JSONL) by category, ``sweep`` decodes one sweep point with plain and
speculative decoding in alternation, ``results`` turns the runs into records of the results.json schema (merged by
key) and tables, ``runner`` runs every point and writes as it goes, ``plots`` and ``wandb_log`` report them, and
``analysis`` serves ``notebooks/analysis.ipynb``.
"""
