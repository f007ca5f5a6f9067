"""Triton kernels for the GPU path (``attention_backend="triton"``). Importing this package imports triton; the
kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
tests check them on machines without a GPU."""
