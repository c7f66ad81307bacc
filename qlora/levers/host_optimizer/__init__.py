"""The optimizer in host memory (train.optimizer_on_cpu): state, fp32 masters and the update in pinned host buffers;
the device keeps each adapter and, until the step, its fp32 gradient."""
