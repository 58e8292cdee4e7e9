"""Experiments, datasets and partitioning, the local simulation runner and the ``fedpriv`` command.

This is the top floor: it composes ``server/`` and ``client/`` with the simulation data sources.
"""
