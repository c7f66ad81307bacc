"""Where every gigabyte goes, before a run and during it (the report, made of both, is qlora/report/):

    arch.py         the shapes memory depends on, read from config.json alone
    activations.py  what a training step keeps per token: a decoder layer's saved tensors, its backward, the loss
    estimate.py     peak bytes of one training step per method, device and host, with its formulas; each lever's
                    terms come from its folder (qlora/levers/*/memory.py)
    terms.py        each term of the estimate with its formula: weights, what trains and its optimizer, the step's
                    candidate peaks, the CUDA context and the allocator's margin
    assumptions.py  the estimate's assumptions and levers in words
    context.py      the longest context a recipe trains on a card, and the plan that reaches it
    profiler.py     peak per named phase of a run, by category (memory.json)
    readings.py     what the profiler reads: the card's or the process's peak, host memory, tensors by category

Nothing is imported here: the trainer needs only parts of it, and none of it needs the trainer.
"""
