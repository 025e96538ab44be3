"""Training on DeepSpeed: the only package that imports deepspeed or torch.distributed."""
