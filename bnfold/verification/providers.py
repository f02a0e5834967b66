"""onnxruntime execution providers bnfold can verify on: a registry, one entry per provider.

Each entry says the provider's onnxruntime name, the options bnfold passes (chosen for true fp32
results and for quiet sessions), and what to tell a user who lacks it. A provider counts as *run*
only when a session was created and ``session.get_providers()`` names it first: onnxruntime quietly
falls back to CPU when a GPU provider's libraries are missing.

Adding a provider is one ``register_provider(ProviderSpec(...))`` call (or one entry below).

Without ``providers=``/``--providers``, bnfold verifies on ``default_providers()``: the providers this
onnxruntime build lists (``onnxruntime.get_available_providers()``), in registry order, of those marked
``by_default``. TensorRT (it builds an engine per session: minutes for a large model), CoreML
(Apple's Neural Engine computes in float16) and OpenVINO (float16 on its GPU device) are verified on
when asked for only.

Options and why:

* never pass ``device_id``: onnxruntime-gpu ≥ 1.26 looks for a registered *plugin* EP device first
  and logs "No registered plugin EP device found for 'CUDAExecutionProvider' with device_id=0" for
  every session when the options name a ``device_id`` (onnxruntime_pybind_state.cc,
  ``CreateExecutionProviderFactoryInstance``; see immich-app/immich#30530). Device 0 is the default.
* CUDA ``use_tf32=0``: the CUDA provider uses TF32 in its convolutions and GEMMs by default (≈1e-3
  relative), which would hide or fake a folding error; bnfold compares in true fp32.
* TensorRT ``trt_fp16_enable=False``/``trt_int8_enable=False``: the defaults, stated so they stay so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from bnfold.errors import ProviderError


@dataclass(frozen=True)
class ProviderSpec:
    key: str  # what users type: --providers cpu,cuda
    ort_name: str  # onnxruntime's name
    options: Mapping[str, str] = field(default_factory=dict)
    install_hint: str = ""
    # the PyTorch reference for this provider's comparisons runs on this torch device when it can
    # ("cuda": the reference is compared on the GPU too, TF32 off), else on the model's device
    torch_device: str | None = None
    # import torch before the session: its CUDA/cuDNN libraries are then already loaded
    needs_torch_cuda: bool = False
    # verified on without being asked for, where this onnxruntime build has it (default_providers)
    by_default: bool = True

    def provider_list(self) -> list:
        """The ``providers=`` argument of ``InferenceSession``: this provider, CPU as fallback."""
        first = (self.ort_name, dict(self.options)) if self.options else self.ort_name
        return [first] if self.ort_name == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]

    def really_runs(self, session) -> tuple[bool, str | None]:
        """(True, None) when ``session`` runs on this provider, else (False, why)."""
        got = session.get_providers()
        if got and got[0] == self.ort_name:
            return True, None
        return False, (f"{self.ort_name} is listed but did not load (session fell back to "
                       f"{got[0] if got else 'nothing'}; CUDA/cuDNN libraries missing?)")


_GPU_HINT = " (install onnxruntime-gpu instead of onnxruntime, README section GPU)"

PROVIDERS: dict[str, ProviderSpec] = {}


def register_provider(spec: ProviderSpec) -> ProviderSpec:
    """Add (or replace) a provider; ``--providers KEY`` then verifies on it."""
    PROVIDERS[spec.key] = spec
    return spec


for _spec in (
    ProviderSpec("cpu", "CPUExecutionProvider"),
    ProviderSpec("cuda", "CUDAExecutionProvider", {"use_tf32": "0"}, _GPU_HINT, torch_device="cuda", needs_torch_cuda=True),
    ProviderSpec("tensorrt", "TensorrtExecutionProvider", {"trt_fp16_enable": "False", "trt_int8_enable": "False"},
                 " (onnxruntime-gpu built with TensorRT, and TensorRT's libraries)", torch_device="cuda", needs_torch_cuda=True,
                 by_default=False),
    ProviderSpec("rocm", "ROCMExecutionProvider", {}, " (onnxruntime-rocm)"),
    ProviderSpec("migraphx", "MIGraphXExecutionProvider", {}, " (onnxruntime-migraphx)"),
    ProviderSpec("openvino", "OpenVINOExecutionProvider", {}, " (onnxruntime-openvino)", by_default=False),
    ProviderSpec("dml", "DmlExecutionProvider", {}, " (onnxruntime-directml, Windows)"),
    ProviderSpec("coreml", "CoreMLExecutionProvider", {}, " (onnxruntime on macOS)", by_default=False),
):
    register_provider(_spec)

DEFAULT_PROVIDERS = None  # none asked for: default_providers(), those this onnxruntime build has


def available_providers() -> list[str]:
    """The registry's providers this onnxruntime build lists, in registry order (listed is not yet
    running: a GPU provider whose libraries are missing falls back to CPU, see ``really_runs``)."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [key for key, spec in PROVIDERS.items() if spec.ort_name in have]


def default_providers() -> list[str]:
    """What verification runs on when no provider is asked for: the available ones marked ``by_default``."""
    return [key for key in available_providers() if PROVIDERS[key].by_default]


def parse_providers(providers: Iterable[str] | str | None) -> list[str]:
    """User text ('cpu,cuda', ['CUDAExecutionProvider']) → registry keys, in order, no repeats;
    None → ``default_providers()``."""
    if providers is None:
        return default_providers()
    if isinstance(providers, str):
        providers = providers.split(",")
    by_ort = {s.ort_name.lower(): k for k, s in PROVIDERS.items()}
    out: list[str] = []
    for p in providers:
        raw = str(p).strip()
        key = raw.lower()
        key = by_ort.get(key, key.replace("executionprovider", ""))
        if key not in PROVIDERS:
            raise ProviderError(f"unknown provider '{raw}'", f"use one or more of {', '.join(PROVIDERS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ProviderError("no provider given", "use --providers cpu,cuda")
    return out


def unavailable_reason(spec: ProviderSpec) -> str | None:
    """Why this onnxruntime build cannot even try ``spec`` (None when it lists it)."""
    import onnxruntime as ort

    if spec.ort_name in ort.get_available_providers():
        return None
    return f"this onnxruntime build ({ort.__version__}) has no {spec.ort_name}{spec.install_hint}"
