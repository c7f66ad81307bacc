"""The input embedding table in host memory (model.embeddings_on_cpu): tokens looked up there, only their vectors sent
to the device; V h e of device memory saved (2.1 GiB for Llama-70B in bf16)."""
