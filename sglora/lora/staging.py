"""One LoRA slot's image in page-locked host memory, and the side stream that copies it into a
device slot (between the slot pool, which packs an adapter into the image, and the pool's
device buffers).

A load on CUDA: the host waits until the previous load's copies have read the image (the only host
wait of a load), and the pool writes every byte of the image, the adapter and zeros around it
(`LoRASlotPool.load`); then the side stream waits for the work queued so far on the compute stream
(the batch in flight may still read the slot being overwritten: with overlap scheduling a request
that finished late can be in it), copies every part asynchronously (one DMA per part), and the
compute stream waits for those copies, so every batch queued later reads the new weights. The host
does not wait for the device, except for back-to-back loads: the second waits for the first's
copies, which wait for the batch in flight. On other devices the image is an ordinary tensor and
the copies are synchronous.

Only this one image is page-locked. The registry's adapter cache stays pageable: pinning every
cached adapter made registering 8 expert adapters of a 30B MoE take 91 s at TP1 and 358 s at
TP4 (lora/registry.py). The image is an ordinary allocation registered with cudaHostRegister,
so it pins exactly its bytes (PyTorch's pinned allocator rounds a block up to a power of two).
"""

from __future__ import annotations

import math
import weakref

import torch


class SlotStaging:
    def __init__(self, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device):
        """`shapes`: of the parts of one slot image, in the order `copy_to` gets them."""
        self.device, self.cuda = device, device.type == "cuda"
        sizes = [math.prod(s) for s in shapes]
        self.image = torch.empty(sum(sizes), dtype=dtype)  # host, all parts back to back
        self.parts = [p.view(s) for p, s in zip(self.image.split(sizes), shapes, strict=True)]
        self.nbytes = self.image.nbytes  # bytes
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # recorded on the side stream after the last load's copies; until then a no-op
        self.copied = torch.cuda.Event() if self.cuda else None
        if self.cuda and self.nbytes:
            portable = 1  # cudaHostRegisterPortable: pinned for every device's context
            torch.cuda.check_error(
                torch.cuda.cudart().cudaHostRegister(self.image.data_ptr(), self.nbytes, portable)
            )
            weakref.finalize(self, _unpin, self.image, self.copied)

    def acquire(self) -> list[torch.Tensor]:
        """The image's parts, holding the last load's image, for the host to overwrite whole.
        Waits for the last load's copies to have read them: the only host wait of a load."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.parts

    def copy_to(self, dsts: list[torch.Tensor]) -> None:
        """Copy each part over its destination (a contiguous device view of the same shape)."""
        assert [d.shape for d in dsts] == [p.shape for p in self.parts]
        if not self.cuda:
            for d, p in zip(dsts, self.parts):
                d.copy_(p)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # after the batch in flight, which may read the slot
        with torch.cuda.stream(self.stream):
            for d, p in zip(dsts, self.parts):
                assert d.is_contiguous()  # one DMA, no temporaries on this stream
                d.copy_(p, non_blocking=True)
                d.record_stream(self.stream)  # the allocator frees it only after these copies
        self.copied.record(self.stream)
        compute.wait_stream(self.stream)  # every later batch sees the new weights


def _unpin(image: torch.Tensor, copied: torch.cuda.Event) -> None:
    copied.synchronize()  # no copy may read the image once it is pageable again
    torch.cuda.cudart().cudaHostUnregister(image.data_ptr())
