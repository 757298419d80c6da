"""The only package that imports deepspeed or calls torch.distributed."""
