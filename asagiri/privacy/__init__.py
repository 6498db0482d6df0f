"""Differential privacy on each site: Opacus DP-SGD, noise from an (epsilon, delta) target, RDP ledger."""
