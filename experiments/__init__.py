"""Experiments: the paper's ablations as sweeps, their launchers (local, Cloud TPU pods, SLURM) and reports.

``python -m experiments.launch --help`` runs a sweep; ``python -m experiments.report ROOT`` writes its
tables and plots; ``python -m experiments.status ROOT`` shows how far it got (experiments/README.md).
"""
