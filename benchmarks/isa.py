"""The environment that runs a benchmark's servers on AVX2 code paths on an AVX-512 machine (``--isa avx2``): the ISA
of an AVX2-only machine, not its clock, caches or memory. No torch import here: it must be set before torch loads."""

TORCH_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""torch's own kernels, oneDNN and MKL held to AVX2."""

AVX2_ENV = {**TORCH_AVX2_ENV, "LOOM_CPU_ARCH": "x86-64-v3"}
"""... and Loom's C++ kernels built for x86-64-v3 (AVX2 + FMA, no AVX-512 or VNNI): the int8 path's vpmaddubsw tiles
and the panel matmul's 3 x 32 ones."""
