"""Harness code shared by all six systems: the device timer, results storage, the claims ledger and its report."""
