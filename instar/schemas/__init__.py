"""Data contracts: `records` (what is stored and trained on) and `outputs` (what a generating LLM returns)."""
