"""Evaluation of drafters by real speculative decoding: prompt sets, sweeps, the results.json schema, tables.

``prompts`` picks prompt sets (the embedded held-out conversations by category), ``sweep`` decodes them with plain
and speculative decoding in alternation and checks outputs, ``results`` turns the runs into records of the
results.json schema and prints the table.
"""
