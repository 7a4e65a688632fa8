"""Compiles every kernel launch of sglora/kernels for sm_90 through Triton's frontend and the
ptxas of the triton wheel, on a machine without a GPU (run by test_sm90_compile.py in a process
without TRITON_INTERPRET): the interpreter checks what the kernels compute, not that they
compile, and CI has no GPU.

The launches are not written out here: the launchers themselves run (sm90_launches.py) on CPU
tensors, told they are on an H200, then on an H100 (132 SMs, PDL, TMA, and each one's tuned MoE
table, so the tile configs of both tables compile), while `JITFunction.run` is replaced by
one that binds the arguments as Triton's launcher does for that target (pointer element types,
int32/int64/fp32 scalars, ints of 1 as constants, 16-divisibility) and records the signature,
constexprs and options instead of launching. Each distinct record is then compiled, in parallel.
The binding is Triton's own (`create_function_from_signature`, `JITFunction._pack_args`,
internals of triton.runtime.jit), so a Triton that changes them fails here, loudly.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, NamedTuple

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import sglora.kernels
from tests.kernels import sm90_launches

TARGET = GPUTarget("cuda", 90, 32)


class Launch(NamedTuple):
    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict
    options: Any  # the backend's options (CUDAOptions)
    scenario: str

    def key(self) -> tuple:
        """Launches that compile to the same binary share a key (alignment hints aside: they
        follow the shapes, and would multiply the variants for little)."""
        consts = tuple(self.constexprs.items())
        return self.kernel, tuple(self.signature.items()), consts, self.options

    def describe(self) -> str:
        names = self.kernel.arg_names
        consts = {names[path[0]]: v for path, v in self.constexprs.items()}
        args = ",".join(t for t in self.signature.values() if t != "constexpr")
        o = self.options
        return (
            f"{self.kernel.fn.__name__} {consts} ({args}) warps={o.num_warps} "
            f"stages={o.num_stages} [{self.scenario}]"
        )


def kernel_modules() -> list[types.ModuleType]:
    return [
        importlib.import_module(f"sglora.kernels.{m.name}")
        for m in pkgutil.iter_modules(sglora.kernels.__path__)
    ]


def all_kernels() -> set[JITFunction]:
    """The `_..._kernel` functions of sglora/kernels: what a launcher launches (the others are
    jitted helpers, inlined into them)."""
    return {
        obj
        for mod in kernel_modules()
        for obj in vars(mod).values()
        if isinstance(obj, JITFunction)
        and obj.module == mod.__name__
        and obj.fn.__name__.endswith("_kernel")
    }


def _interpreting(fn: types.FunctionType) -> types.FunctionType:
    """fn with `interpreting()` true: the launchers' device checks then accept CPU tensors,
    while the tile and config choices still take their GPU branches."""
    namespace = dict(fn.__globals__, interpreting=lambda: True)
    return types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)


# The GPUs whose tuned MoE tables (kernels/configs/moe_<name>.json) the launches read, in turn
TABLE_DEVICES = ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3")


@contextlib.contextmanager
def as_on(device_name: str) -> Iterator[None]:
    """The device helpers of sglora/kernels answer as this sm90 GPU of 132 SMs would: Hopper (TMA
    weights, PDL), its tuned MoE configs; CPU tensors pass the launchers' checks."""
    from sglora.kernels import device, lora_token, moe_common

    answers = {
        device.hopper_or_newer: lambda dev: True,
        device.num_sms: lambda dev: sm90_launches.NUM_SMS,
        moe_common.device_name: lambda: device_name,
        moe_common.check_tensor: _interpreting(moe_common.check_tensor),
        lora_token.check_device: _interpreting(lora_token.check_device),
    }
    # each module holds its own reference to a helper it imported
    patched = [
        (mod, name, obj)
        for mod in kernel_modules()
        for name, obj in vars(mod).items()
        if isinstance(obj, types.FunctionType) and obj in answers
    ]
    for mod, name, obj in patched:
        setattr(mod, name, answers[obj])
    try:
        yield
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)


@contextlib.contextmanager
def recording(record: Callable[[Launch], None]) -> Iterator[None]:
    """Kernel launches call `record` with the Launch (bound as Triton binds it for TARGET) and
    return None instead of running."""
    backend = make_backend(TARGET)
    binders: dict[JITFunction, Callable] = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound, specialization, options
        )
        record(Launch(self, signature, constexprs, attrs, options, ""))

    original = JITFunction.run
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def recorded_launches() -> list[Launch]:
    """The distinct launches of the scenarios of sm90_launches.py on each of TABLE_DEVICES, in
    first-seen order, each labelled with the scenario (and device) that first made it."""
    distinct: dict[tuple, Launch] = {}
    label = ""

    def record(launch: Launch) -> None:
        distinct.setdefault(launch.key(), launch._replace(scenario=label))

    for device_name in TABLE_DEVICES:
        with as_on(device_name), recording(record):
            for scenario in sm90_launches.scenarios():
                label = f"{scenario.label}, {device_name}"
                try:
                    with scenario.pdl():
                        scenario.launches()
                except Exception as exc:
                    raise RuntimeError(f"scenario {label!r} failed to launch") from exc
    return list(distinct.values())


_VARIANTS: list[Launch] = []  # read by the forked compile workers


def _compile(i: int) -> str | None:
    v = _VARIANTS[i]
    src = ASTSource(v.kernel, v.signature, v.constexprs, v.attrs)
    try:
        triton.compile(src, target=TARGET, options=v.options.__dict__)
    except Exception as exc:  # every failing variant is reported, then the run fails
        return f"{type(exc).__name__}: {exc}"[:3000]
    return None


def main() -> int:
    start = time.monotonic()
    _VARIANTS[:] = recorded_launches()
    missing = all_kernels() - {v.kernel for v in _VARIANTS}
    for kernel in sorted(missing, key=lambda k: k.fn.__name__):
        print(f"NOT LAUNCHED {kernel.module}.{kernel.fn.__name__}")
    print(f"{len(_VARIANTS)} variants recorded in {time.monotonic() - start:.1f} s", flush=True)
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        errors = list(pool.map(_compile, range(len(_VARIANTS))))
    for v, err in zip(_VARIANTS, errors):
        print(f"ok {v.describe()}" if err is None else f"FAILED {v.describe()}: {err}")
    failed = sum(err is not None for err in errors)
    print(f"{len(_VARIANTS) - failed} compiled, {failed} failed, "
          f"{time.monotonic() - start:.1f} s on {workers} processes")  # fmt: skip
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
