"""What the training loop (qlora/train.py) needs, and what evaluation, measurement and the benchmarks share with it:

    assemble.py     the model put together: base, adapters, checkpointing, levers; a finished run rebuilt
    step.py         one step's forward and backward; the held-out evaluation
    loss.py         the loss over target tokens; held-out statistics
    optimizer.py    AdamW and its schedule
    metrics.py      metrics.jsonl
    checkpoint.py   checkpoints and the adapter, written atomically
    restore.py      a checkpoint read back with every file checked; --resume from the newest usable one
    rundir.py       the output directory: whose run it holds, the names it owns, the lock, the first write
    runconfig.py    run_config.json: what its checkpoints fix in it, what --resume may change
    progress.py     where the run stands: what a checkpoint carries over and --resume reads back; the progress bar
    guard.py        signals, out of memory, non-finite steps: stop cleanly and explain
    oom.py          the out-of-memory report: the phase, the memory, the changes that would fit
    distributed.py  several processes (torchrun): ranks, summed gradients
    launch.py       several processes meeting and parting: the process group, a rank's ending, a lost process
    sensitivity.py  quant.keep_16bit_budget: the layers whose 4-bit rounding costs most, measured
"""
