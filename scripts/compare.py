"""Compare runs across methods: one table (markdown + CSV) and plots.

    python scripts/compare.py runs=[<dir>,<dir>,...]
    python scripts/compare.py runs=outputs/multirun/2026-11-22_21-00-00     # every job of a sweep
    python scripts/compare.py 'runs=outputs/multirun/2026-11-22_21-00-00/*' aggregate=true
    python scripts/compare.py runs=[...] curves=true wandb=true

Series are keyed by (model, task, method, the settings that differ, seed): two seeds of one
method are two lines; ``aggregate=true`` pools the seeds into mean ± std (a band). The metric is
the task's (``ppl`` for decoder runs, lower is better; its plot has a log axis); ``rank`` orders
the series at each budget in its direction, and the hypervolume is of (average bits, 1 − metric)
or, for lower-is-better metrics, of (average bits, metric) (log ppl for perplexity). Outputs, in
``out`` (default ``outputs/compare/<date>``): ``comparison.md`` / ``comparison.csv``,
``<metric>_vs_bits.png``, ``time_vs_configs.png`` (measured fit times: a per-configuration method
needs one fit per configuration, CoA-LoRA one for all; arXiv 2509.25214, Figure 1) and, with
``curves=true``, ``train_loss.png``. Configuration: ``conf/compare.yaml``; the stage:
``coalora.stages.compare``.
"""

from coalora.cli.compare import main  # also installed as `coalora-compare`

if __name__ == "__main__":
    main()
