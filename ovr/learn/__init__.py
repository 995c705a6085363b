"""Embeddings -> heads, statistics, gate -> answers: the solver, `Model`, and its folder format."""
