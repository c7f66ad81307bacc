"""`python -m qlora.memory RECIPE.py`: the memory report. The estimate for full fine-tuning, 16-bit LoRA and QLoRA
(qlora/memory/), measured steps of each in fresh processes (measure.py), the report as text, JSON, markdown and a plot
(memory.py, contents.py, markdown.py, plot.py), and the longest context per card (--max-context).

`python -m qlora.report.snapshot SNAPSHOT`: what a CUDA allocator snapshot held at its peak (snapshot.py), the trace
replayed (replay.py) and each block put to a term of the estimate (attribution.py); recorder.py writes such a snapshot
from a CPU run."""
