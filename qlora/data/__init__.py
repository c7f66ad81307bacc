"""Training data: rows read from a file or the hub (files.py); their format (chat, instruction, text), tokenised with
labels masked where the model should not learn, the train and held-out splits (splits.py); batched by seed (batches.py);
rows packed into full-length sequences with document boundaries kept (pack.py)."""
