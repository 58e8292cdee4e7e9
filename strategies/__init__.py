"""Federated strategies: one module per algorithm, DP and budgets added by wrapping."""
