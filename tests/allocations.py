"""A dispatch-mode spy on the allocator: which new storages the ops of a block of code create."""

import torch


class NewStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the size (in elements of the output) of every new storage an op creates; views and
    in-place ops reuse their inputs' storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out
