"""Training data: rows read from a file or the hub, their format (chat, instruction, text), tokenised with labels
masked where the model should not learn, batched by seed (read.py); rows packed into full-length sequences with
document boundaries kept (pack.py)."""
