"""Counting host syncs: what makes the host wait for the device, for tests and the UNet benchmark."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sampling_helpers import record_chunks, sample

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten.unique_consecutive.default, aten._unique2.default}


class HostSyncs(TorchFunctionMode):
    """Counts what makes the host wait for the device: reading a value (item/float/int/bool: ``_local_scalar_dense``),
    data-dependent shapes (nonzero, boolean masks, unique), copies to the host (``cpu()``, ``tolist()``, ``numpy()``).
    On CPU tensors these calls still happen, so a CPU run counts them. (``to(device)`` is not counted: on a CPU run
    a move to the host cannot be told from a move to the compute device, which ComfyUI's ops make all the time.)
    ``copies``: also count tensors made from host data (``torch.tensor``, ``as_tensor``): on a GPU each is a copy to
    the device, which blocks the host unless made on the CPU and moved with ``non_blocking``."""

    def __init__(self, copies: bool = False):
        super().__init__()
        self.count = 0
        self.names = ("cpu", "tolist", "numpy") + (("tensor", "as_tensor") if copies else ())
        outer = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                masked = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
                outer.count += func in _READS or masked
                return func(*args, **(kwargs or {}))
        self.ops = Ops()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.names
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        super().__enter__()
        self.ops.__enter__()
        return self

    def __exit__(self, *exc):
        self.ops.__exit__(*exc)
        return super().__exit__(*exc)


def syncs_per_call(model, images=3, kind="sdxl", steps=2, copies=False, **sample_args) -> float:
    """Host syncs per model call while the stock sampler draws ``images`` images with ``model`` (``copies``: see
    :class:`HostSyncs`)."""
    calls = []
    counted = record_chunks(model.clone(), calls)
    with HostSyncs(copies) as syncs:
        sample(counted, images, kind=kind, steps=steps, **sample_args)
    return syncs.count / len(calls)
