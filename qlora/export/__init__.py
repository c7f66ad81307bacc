"""`python -m qlora.export RUN_DIR --gguf OUT.gguf [--type f16|bf16|q8_0|q4_0]`: the trained model as one GGUF file,
the format llama.cpp, Ollama and LM Studio run, checked against the run before it is called good.

    architecture.py  which models the export writes (llama.cpp's architecture for each) and the refusal of the rest
    gguf_file.py     the adapter merged onto its base as it trained (qlora.merge's fold), streamed in llama.cpp's layout
    tokenizer.py     the run's tokenizer as the file's metadata, and the pre-tokenizer llama.cpp is to split text by
    check.py         the file read back by transformers and held to the run on held-out rows, within its type's bound
    __main__.py      the command: its flags, and the held-out data found before the export rather than after it
"""
