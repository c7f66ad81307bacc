"""What trains on the base: LoRA adapters, their PEFT file format and merge (lora.py), adapters started at the rank-r
correction of the NF4 rounding (loftq.py), and fp32 master copies for 16-bit adapters (master.py)."""
