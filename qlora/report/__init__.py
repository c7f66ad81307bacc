"""`python -m qlora.memory RECIPE.py`: the memory report. The estimate for full fine-tuning, 16-bit LoRA and QLoRA
(qlora/memory/), measured steps of each in fresh processes (measure.py), the report as text, JSON, markdown and a plot
(memory.py, contents.py, markdown.py, plot.py), and the longest context per card (--max-context)."""
