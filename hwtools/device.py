"""What the device can do fast: bf16 support (native, not emulated) and TF32 matmuls on CUDA."""
from __future__ import annotations

import torch

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores


def bf16_supported(device) -> bool:
    """True on a CUDA device with native bf16 (compute capability >= 8.0). torch.cuda.is_bf16_supported() is also
    true on T4/V100 through emulation, where fp16 tensor cores are the fast path."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def low_precision_dtype(device) -> torch.dtype:
    """The 16-bit dtype that is fast on `device`: bf16 where native, else fp16."""
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def enable_tf32(device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (what stays fp32 outside autocast: an
    upcast LM head, fp32 weights without mixed precision). No-op elsewhere; -> whether it was enabled."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True
