"""Numeric precision: what the processor computes natively, and the choice of mixed precision.

Training: ``train.amp`` is ``auto``, ``bf16``, ``fp16`` or ``off``. ``auto`` turns bfloat16
autocast on where the device multiplies bfloat16 matrices in hardware (CUDA GPUs with
bf16 support; CPUs with AMX-BF16 or AVX512-BF16) and leaves it off elsewhere, where
bfloat16 would be emulated and slower than float32. :func:`resolve_amp` logs the choice
and the reason in one line. Inference: ``--dtype float32|bf16`` (:func:`parse_dtype`).

Under autocast the network's convolutions run in the low precision; what needs float32
stays there (the last regression conv, the per-level scales and the box decoding in
:class:`o2f.model.head.O2FHead`; the assignment reads float32 copies; the losses take
float32 inputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("o2f")

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for low-precision matrix work.

    capability: PyTorch's vector ISA (``torch.backends.cpu.get_cpu_capability()``, e.g.
    "AVX2", "AVX512"); amx_bf16 / avx512_bf16: bfloat16 matrix instructions; vnni: int8
    dot products (AVX512-VNNI or AMX-INT8); name: the model name, for reports."""

    capability: str
    amx_bf16: bool
    avx512_bf16: bool
    vnni: bool
    name: str = ""

    @property
    def native_bf16(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        units = [n for n, ok in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16),
                                 ("VNNI", self.vnni)) if ok]
        return (f"{self.name or 'CPU'} ({self.capability}"
                + (", " + ", ".join(units) if units else ", no bf16/int8 matrix units") + ")")


def _cpuinfo() -> tuple[set[str], str]:
    """The flags and model name of the first processor in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), ""
    flags, name = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not name:
            name = value.strip()
    return flags, name


def _torch_probe(name: str) -> bool | None:
    """PyTorch's own CPUID probe ``torch.cpu._is_<name>_supported`` where it exists."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(probe()) if probe is not None else None
    except Exception:  # a probe that fails says nothing
        return None


def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures`: PyTorch's CPUID probes first, the kernel's
    /proc/cpuinfo flags (amx_bf16, avx512_bf16, avx512_vnni, amx_int8) where they are absent."""
    flags, name = _cpuinfo()
    amx = _torch_probe("amx_tile")
    bf16 = _torch_probe("avx512_bf16")
    vnni = _torch_probe("vnni")
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        amx_bf16=amx if amx is not None else "amx_bf16" in flags,
        avx512_bf16=bf16 if bf16 is not None else "avx512_bf16" in flags,
        vnni=vnni if vnni is not None else bool({"avx512_vnni", "amx_int8"} & flags),
        name=name)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 matrices in hardware, and why (for the log)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, (f"{torch.cuda.get_device_name(device)} "
                    f"{'supports' if ok else 'has no native'} bfloat16")
    if device.type == "cpu":
        features = cpu_features()
        return features.native_bf16, features.describe()
    return False, f"no bfloat16 detection for {device.type} devices"


def resolve_amp(value: str | bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` asks for on ``device``, or None for float32.

    ``auto``: bfloat16 where ``device`` runs it natively, else float32 (never an error);
    ``bf16`` / ``fp16``: that type whatever the hardware (float16 on CUDA only); ``off``:
    float32. Old configs' booleans mean ``auto`` (true) and ``off`` (false). Logs one line.
    """
    from o2f.config import ConfigError

    device = torch.device(device)
    if isinstance(value, bool):
        value = "auto" if value else "off"
    choice = str(value).lower()
    if choice not in AMP_CHOICES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_CHOICES)}, got '{value}'")
    if choice == "off":
        log.info("precision: float32 (train.amp=off)")
        return None
    if choice == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; on the CPU use bf16 or auto")
        log.info("precision: float16 autocast with loss scaling (train.amp=fp16)")
        return torch.float16
    if choice == "bf16":
        ok, why = native_bf16(device)
        log.info("precision: bfloat16 autocast (train.amp=bf16)%s",
                 "" if ok else f"; emulated, likely slower than float32: {why}")
        return torch.bfloat16
    ok, why = native_bf16(device)
    if ok:
        log.info("precision: bfloat16 autocast (train.amp=auto: %s)", why)
        return torch.bfloat16
    log.info("precision: float32 (train.amp=auto: %s; bfloat16 would be emulated)", why)
    return None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``fp32`` or ``bf16`` / ``bfloat16`` (a torch dtype passes through)."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16):
            raise ValueError(f"inference dtype must be float32 or bfloat16, got {name}")
        return name
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; choose float32 or bf16") from None


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float32")  # type: ignore[arg-type]


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """An autocast region of ``dtype`` on ``device`` (disabled for None / float32)."""
    device = torch.device(device)
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled)
