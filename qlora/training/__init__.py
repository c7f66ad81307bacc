"""What the training loop (qlora/train.py) needs, and what evaluation, measurement and the benchmarks share with it:

    assemble.py     the model put together: base, adapters, checkpointing, levers; a finished run rebuilt
    step.py         one step's forward and backward; the held-out evaluation
    loss.py         the loss over target tokens; held-out statistics
    optimizer.py    AdamW and its schedule
    metrics.py      metrics.jsonl
    checkpoint.py   atomic checkpoints, read back with every file checked
    rundir.py       the output directory: whose run, what --resume may change, the lock, the first write
    guard.py        signals, out of memory, non-finite steps: stop cleanly and explain
    distributed.py  several processes (torchrun): ranks, summed gradients, a lost process
    sensitivity.py  quant.keep_16bit_budget: the layers whose 4-bit rounding costs most, measured
"""
