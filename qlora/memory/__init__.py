"""Where every gigabyte goes, before a run and during it (the report, made of both, is qlora/report/):

    arch.py         the shapes memory depends on, read from config.json alone
    activations.py  what a training step keeps per token: a decoder layer's saved tensors, its backward, the loss
    estimate.py     peak bytes of one training step per method, device and host: the terms added up at the step's
                    peak; each lever's terms come from its folder (qlora/levers/*/memory.py)
    terms.py        each term of the estimate with its formula: weights, what trains and its optimizer, the step's
                    candidate peaks, the CUDA context and the allocator's margin
    assumptions.py  the estimate's assumptions and levers in words
    preflight.py    the check before the base loads: a step the estimate puts beyond the card or host is refused
    context.py      the longest context a recipe trains on a card, and the plan that reaches it
    plan.py         train.plan=fastest: the levers that cost least step time among those that fit
    candidates.py   what the plan chooses among: each lever on and off, the batch shapes, what each costs
    costs.py        what each lever adds to a step's time: the one table the plan orders the levers by
    depth.py        probes of k of a model's L layers, and the full-depth peak computed from them
    profiler.py     peak per named phase of a run, by category (memory.json)
    readings.py     what the profiler reads: the card's or the process's peak, host memory, tensors by category
    cgroup.py       the host memory a container's memory cgroup leaves the process (v1 and v2)

Nothing is imported here: the trainer needs only parts of it, and none of it needs the trainer.
"""
