"""Systems the S-LoRA workload is replayed into: this engine (and its ablations), PEFT, Triton."""
