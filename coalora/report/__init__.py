"""Result tables, curves, Pareto plots and W&B tables."""
