"""Our Triton kernels: the fused NF4 (+ LoRA) matmul that decode runs on GPUs (CUDA and ROCm alike)."""
