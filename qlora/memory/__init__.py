"""Where every gigabyte goes: the estimate from a config.json, the profiler of a run, measured steps, the report.

    arch.py      the shapes memory depends on, read from config.json alone
    estimate.py  peak bytes of one training step per method, with its formulas
    profiler.py  peak per named phase of a run, by category (memory.json)
    measure.py   real training steps of one method in a fresh process
    report.py    `python -m qlora.memory`: estimate (and measurement) for full, LoRA and QLoRA
    markdown.py, plot.py  the report as markdown and PNG

Nothing is imported here: the trainer needs only the profiler, and the report must not pull in the trainer.
"""
